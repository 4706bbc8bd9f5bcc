"""Kafka security in memory: the client configs (core.kafka), the TLS/SASL broker properties,
the certificates (infra.kafka.tls) and the ACL table (infra.kafka.acls); no broker."""

from __future__ import annotations

import ast
import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from core import kafka, topics
from core.errors import ConfigError
from core.settings import Settings, load
from infra.kafka import acls, launcher, tls
from keypulse import cli
from keypulse.commands import kafka as kafka_command

REPO = Path(__file__).resolve().parents[2]
SECURITY_KEYS = {
    "security.protocol",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.endpoint.identification.algorithm",
}

Builder = Callable[[Settings], dict[str, Any]]
BUILDERS: dict[str, Builder] = {
    "producer": kafka.producer_config,
    "consumer": lambda s: kafka.consumer_config(s, group_id="g"),
    "admin": kafka.admin_config,
}


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "dev": True,
        "kafka_bootstrap": "127.0.0.1:19192",
        "kafka_security_protocol": "PLAINTEXT",
        "kafka_sasl_username": "",
        "kafka_sasl_password": "",
        "kafka_ssl_ca_file": None,
        "kafka_ssl_check_hostname": True,
    }
    return load(**(base | overrides))


def _security_part(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key in SECURITY_KEYS}


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


# -- client configs ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_plaintext_says_so_and_carries_nothing_else(kind: str) -> None:
    config = BUILDERS[kind](_settings())
    assert _security_part(config) == {"security.protocol": "PLAINTEXT"}
    assert config["bootstrap.servers"] == "127.0.0.1:19192"


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_ssl_with_a_ca_file_checks_the_hostname(kind: str, ca_file: Path) -> None:
    config = BUILDERS[kind](_settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=ca_file))
    assert _security_part(config) == {
        "security.protocol": "SSL",
        "ssl.ca.location": str(ca_file),
        "ssl.endpoint.identification.algorithm": "https",
    }


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_sasl_ssl_carries_credentials_and_tls(kind: str, ca_file: Path) -> None:
    settings = _settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="keypulse-api",
        kafka_sasl_password="s3cret-pw",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_ssl_ca_file=ca_file,
        kafka_ssl_check_hostname=False,
    )
    assert _security_part(BUILDERS[kind](settings)) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "keypulse-api",
        "sasl.password": "s3cret-pw",
        "ssl.ca.location": str(ca_file),
        "ssl.endpoint.identification.algorithm": "none",
    }


def test_sasl_plaintext_has_no_tls_settings(ca_file: Path) -> None:
    settings = _settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
        kafka_ssl_ca_file=ca_file,
    )
    part = _security_part(kafka.producer_config(settings))
    assert part == {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p",
    }


def test_ssl_without_a_ca_file_uses_the_system_store() -> None:
    part = _security_part(kafka.admin_config(_settings(kafka_security_protocol="SSL")))
    assert "ssl.ca.location" not in part
    assert part["ssl.endpoint.identification.algorithm"] == "https"


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize(("user", "password"), [("", "pw"), ("u", ""), ("", "")])
def test_sasl_without_credentials_is_one_clear_line(kind: str, user: str, password: str) -> None:
    settings = _settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_username=user, kafka_sasl_password=password
    )
    with pytest.raises(
        ConfigError,
        match=r"^KEYPULSE_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs "
        r"KEYPULSE_KAFKA_SASL_USERNAME and KEYPULSE_KAFKA_SASL_PASSWORD",
    ) as info:
        BUILDERS[kind](settings)
    assert "\n" not in str(info.value)


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    settings = _settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=tmp_path / "no.pem")
    with pytest.raises(ConfigError, match=r"KEYPULSE_KAFKA_SSL_CA_FILE=.*no\.pem is not"):
        kafka.consumer_config(settings)


def test_overrides_still_win(ca_file: Path) -> None:
    settings = _settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=ca_file)
    config = kafka.producer_config(settings, **{"ssl.endpoint.identification.algorithm": "none"})
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert config["security.protocol"] == "SSL"


CLIENTS = {"Producer", "Consumer", "AdminClient"}
FACTORIES = {"producer_config", "consumer_config", "admin_config"}
# Variables that hold a factory's config: the pipeline's source and sink take one as a
# parameter (pipeline/runner.py builds it), kafka_feed and system build `config` just before.
CONFIG_VARIABLES = {"config", "consumer_config", "sink.producer_config"}


def test_no_client_is_built_around_core_kafka() -> None:
    """Every confluent-kafka client outside the tests is built from a core.kafka config, so
    security reaches all of them."""
    seen = 0
    for folder in ("api", "ws_bridge", "pipeline", "core", "keypulse", "infra", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in CLIENTS
                ):
                    continue
                seen += 1
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                assert node.args, where
                argument = node.args[0]
                if isinstance(argument, ast.Call):
                    assert ast.unparse(argument.func) in FACTORIES, where
                else:
                    assert ast.unparse(argument) in CONFIG_VARIABLES, where
    assert seen >= 15


# -- the broker's properties ---------------------------------------------------------------


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_tls_broker_properties(tmp_path: Path) -> None:
    settings = _settings(data_dir=tmp_path)
    files = tls.TlsFiles(tmp_path / "tls")
    props = _properties(launcher.render_server_properties(settings, launcher.BrokerSecurity(files)))
    assert props["listeners"] == "SSL://127.0.0.1:19192,CONTROLLER://127.0.0.1:19193"
    assert props["advertised.listeners"] == "SSL://127.0.0.1:19192"
    assert props["listener.security.protocol.map"] == "SSL:SSL,CONTROLLER:PLAINTEXT"
    assert props["inter.broker.listener.name"] == "SSL"
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PEM"
    assert props["ssl.keystore.location"] == str(files.keystore)
    assert props["ssl.truststore.location"] == str(files.ca_cert)
    assert "authorizer.class.name" not in props
    plain = _properties(launcher.render_server_properties(settings))
    assert plain["listeners"] == "PLAINTEXT://127.0.0.1:19192,CONTROLLER://127.0.0.1:19193"
    assert not any(key.startswith(("ssl.", "sasl.")) for key in plain)


def test_sasl_broker_properties(tmp_path: Path) -> None:
    settings = _settings(data_dir=tmp_path)
    security = launcher.BrokerSecurity(tls.TlsFiles(tmp_path / "tls"), ("admin", "adm=in-pw1"))
    props = _properties(launcher.render_server_properties(settings, security))
    assert props["listeners"] == "SASL_SSL://127.0.0.1:19192,CONTROLLER://127.0.0.1:19193"
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:SASL_SSL"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert props["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert props["super.users"] == "User:admin"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    scram = props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    assert 'username="admin" password="adm=in-pw1";' in scram
    assert 'user_admin="adm=in-pw1";' in props["listener.name.controller.plain.sasl.jaas.config"]


@pytest.mark.parametrize(
    ("user", "password", "problem"),
    [
        ("", "pw", "needs the admin"),
        ("admin", "", "needs the admin"),
        ("ad min", "pw", "USERNAME"),
        ("admin", 'p"w', "PASSWORD"),
        ("admin", "p,w", "PASSWORD"),
        ("admin", "p w", "PASSWORD"),
        ("admin", "pässword", "printable ASCII"),
        ("admin", "p\\w", "PASSWORD"),
    ],
)
def test_unusable_admin_credentials_are_refused(user: str, password: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        launcher.check_admin(user, password)


def test_storage_formatted_without_the_admin_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.properties").write_text("version=1\n")
    props = tmp_path / "server.properties"
    with pytest.raises(ConfigError, match=r"formatted without the SASL admin 'admin'"):
        launcher._format_storage("java", tmp_path, tmp_path, props, ("admin", "pw"))
    (tmp_path / "sasl.admin").write_text("admin\n")
    launcher._format_storage("java", tmp_path, tmp_path, props, ("admin", "pw"))  # no format
    launcher._format_storage("java", tmp_path, tmp_path, props)  # plain start: as before


# -- certificates --------------------------------------------------------------------------


def _server_cert(files: tls.TlsFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificates(files.keystore.read_bytes())[0]


def test_certificates_are_made_once_and_name_the_host(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    files, made = tls.ensure(tmp_path / "tls", ("kafka.internal",), now=now)
    assert made
    assert files.keystore.stat().st_mode & 0o777 == 0o600
    assert files.ca_key.stat().st_mode & 0o777 == 0o600
    keystore = files.keystore.read_text()
    assert keystore.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, as Kafka's PEM needs
    assert keystore.count("BEGIN CERTIFICATE") == 2  # the server's, then the CA's
    cert = _server_cert(files)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"kafka.internal", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    again, made_again = tls.ensure(tmp_path / "tls", ("kafka.internal",), now=now)
    assert not made_again
    assert _server_cert(again).serial_number == cert.serial_number


def test_the_server_certificate_is_renewed_under_the_same_ca(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    files, _ = tls.ensure(tmp_path / "tls", ("127.0.0.1",), now=now)
    ca_before = files.ca_cert.read_bytes()
    first = _server_cert(files)
    due = now + dt.timedelta(days=tls.SERVER_DAYS - tls.RENEW_DAYS + 1)
    assert tls.server_problem(files, ("127.0.0.1",), due) is not None
    _, renewed = tls.ensure(tmp_path / "tls", ("127.0.0.1",), now=due)
    assert renewed
    second = _server_cert(files)
    assert second.serial_number != first.serial_number
    assert second.not_valid_after_utc > first.not_valid_after_utc
    assert files.ca_cert.read_bytes() == ca_before
    second.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    # a host the certificate does not name: made again
    _, for_new_host = tls.ensure(tmp_path / "tls", ("broker.example",), now=due)
    assert for_new_host


# -- ACLs ----------------------------------------------------------------------------------


def test_the_acl_table_honours_the_topic_prefix() -> None:
    grants = acls.grants("t1.")
    topic_grants = [g for g in grants if g.resource == "TOPIC"]
    assert topic_grants
    assert all(g.name.startswith("t1.") and g.pattern == "LITERAL" for g in topic_grants)
    assert {g.name for g in topic_grants} == {f"t1.{spec.name}" for spec in topics.TOPICS}
    rules = {(g.principal, g.operation) for g in grants if g.name == "t1.alert.rules"}
    assert rules == {("User:keypulse-api", "WRITE"), ("User:keypulse-pipeline", "READ")}
    groups = {(g.principal, g.name, g.pattern) for g in grants if g.resource == "GROUP"}
    assert ("User:keypulse-ws", "keypulse-ws-", "PREFIXED") in groups
    assert ("User:keypulse-pipeline", "keypulse-pipeline", "LITERAL") in groups


def test_every_group_id_in_the_code_is_in_the_table() -> None:
    found: set[str] = set()
    for folder in ("api", "ws_bridge", "pipeline", "core"):
        for path in (REPO / folder).rglob("*.py"):
            found |= set(re.findall(r'group_id=f?"([^"{]*)', path.read_text()))
            found |= set(re.findall(r'group = f?"([^"{]*)', path.read_text()))
    assert {"keypulse-pipeline", "keypulse-system", "keypulse-ws-"} <= found
    granted = [g for g in acls.grants() if g.resource == "GROUP"]
    for group in found:
        assert any(
            group == g.name or (g.pattern == "PREFIXED" and group.startswith(g.name))
            for g in granted
        ), group


def test_docs_hold_the_acl_table() -> None:
    assert acls.render_table() in (REPO / "docs" / "kafka-security.md").read_text()


def _run(*argv: str, settings: Settings) -> int:
    args = cli.build_parser(["kafka"]).parse_args(["kafka", *argv])
    return kafka_command.run(args, settings)


def test_acls_show_prints_the_table_with_the_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("acls", "show", settings=_settings(topic_prefix="t2.")) == 0
    out = capsys.readouterr().out
    assert out.strip() == acls.render_table("t2.")
    assert "`t2.alert.rules`" in out


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (("acls",), "needs show or apply"),
        (("start", "show"), "belong to `keypulse kafka acls`"),
        (("status", "--tls"), "belong to `keypulse kafka start`"),
        (("acls", "show", "--password-dir", "/tmp"), "belongs to `keypulse kafka acls apply`"),
    ],
)
def test_misplaced_kafka_arguments_are_refused(argv: tuple[str, ...], problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        _run(*argv, settings=_settings())


def test_passwords_are_read_per_principal(tmp_path: Path) -> None:
    for role in acls.ROLES:
        (tmp_path / role.name).write_text(f"{role.name}-password\n")
    assert acls.read_passwords(tmp_path) == {
        "keypulse-api": "keypulse-api-password",
        "keypulse-ws": "keypulse-ws-password",
        "keypulse-pipeline": "keypulse-pipeline-password",
    }
    (tmp_path / "keypulse-ws").unlink()
    with pytest.raises(ConfigError, match=r"password of User:keypulse-ws from .*keypulse-ws"):
        acls.read_passwords(tmp_path)
    (tmp_path / "keypulse-ws").write_text("short\n")
    with pytest.raises(ConfigError, match="fewer than 12 characters"):
        acls.read_passwords(tmp_path)

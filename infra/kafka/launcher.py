"""A local single-node Apache Kafka (KRaft) for development and tests (DESIGN §6).

One JVM runs broker and controller together (`process.roles=broker,controller`), from
jars that Maven fetches once from Maven Central into `~/.cache/keypulse/kafka-<version>/lib`
(`pom.xml` next to this module). Maven fetches with strict checksums (`-C`: a download without
Central's checksum, or not matching it, fails), and every start holds the cache against
`jars.sha256`, the SHA-256 of every jar on the broker's classpath committed with this module:
a jar changed, missing or added after the fetch is refused before the JVM starts. Everything
the broker writes lives under `<settings.data_dir>/kafka`:

    server.properties   rendered from the settings at every start
    cluster.id          the KRaft cluster id the storage was formatted with
    data/               log.dirs (formatted once with kafka.tools.StorageTool)
    logs/server.log     the broker's log (log4j2.properties)
    broker.out          the JVM's stdout/stderr: warnings, errors, crashes
    broker.pid          the pid of the running broker
    tls/                `start --tls`/`--sasl`: the CA and the broker's certificate (tls.py)
    sasl.admin          `start --sasl`: the admin the storage was formatted with

`start --tls` makes the bootstrap address a TLS listener, `start --sasl` a SASL_SSL one with
the ACL authorizer (`BrokerSecurity`; docs/kafka-security.md); plain `start` is PLAINTEXT.
`start`, `stop` and `status` return one line for a human; expected failures raise
`DependencyError` (no java, no mvn) or `ServiceError` (download, start or admin failed).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource  # re-exported by .admin, untyped there
from confluent_kafka.cimpl import NewTopic

from core.errors import ConfigError, DependencyError, ServiceError
from core.kafka import admin_config
from core.settings import Settings
from core.topics import TOPICS
from infra.kafka import tls

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

KAFKA_VERSION = "4.1.1"
MIN_JAVA = 17
HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
MANIFEST = HERE / "jars.sha256"  # `sha256sum -c` format; how to regenerate: its header
LOG4J_CONFIG = HERE / "log4j2.properties"
BROKER_MAIN = "kafka.Kafka"
BROKER_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"
JAVA_HINT = "install a JDK 17 or newer (e.g. apt-get install openjdk-17-jre-headless)"
MAVEN_HINT = "install Maven 3.8 or newer (e.g. apt-get install maven)"
REGENERATE_HINT = (
    "if infra/kafka/pom.xml changed on purpose, regenerate infra/kafka/jars.sha256 (see its header)"
)


# -- prerequisites ----------------------------------------------------------------------


def java_major(version_output: str) -> int | None:
    """The major version in `java -version` output (`"17.0.15"` → 17, `"1.8.0_392"` → 8)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:
        return int(match.group(2))
    return major


def check_java() -> str:
    """The path of a Java 17+ `java` on PATH; DependencyError otherwise."""
    java = shutil.which("java")
    if java is None:
        msg = f"Java {MIN_JAVA}+ not found on PATH: {JAVA_HINT}"
        raise DependencyError(msg)
    try:
        proc = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"cannot run {java} -version ({exc}): {JAVA_HINT}"
        raise DependencyError(msg) from None
    major = java_major(proc.stderr + proc.stdout)
    if major is None or major < MIN_JAVA:
        found = f"Java {major}" if major else "an unrecognised Java"
        msg = f"{found} at {java}, but Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+: {JAVA_HINT}"
        raise DependencyError(msg)
    return java


def cache_dir() -> Path:
    return Path.home() / ".cache" / "keypulse" / f"kafka-{KAFKA_VERSION}"


def ensure_jars(
    *, cache: Path | None = None, manifest: Path = MANIFEST, progress: Progress | None = None
) -> Path:
    """The directory holding the broker's jars, fetched with Maven the first time.

    The jars are held against `manifest` on every call (hashing all 44 MB takes 0.04-0.14 s),
    so a jar changed in the cache after the fetch never reaches the JVM.
    """
    root = cache or cache_dir()
    lib, marker = root / "lib", root / "lib.complete"
    if marker.is_file() and (lib / BROKER_JAR).is_file():
        verify_jars(lib, manifest, remedy=_refetch_hint(root))
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        msg = f"Maven (mvn) not found on PATH, needed once to fetch the Kafka jars: {MAVEN_HINT}"
        raise DependencyError(msg)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if marker.is_file() and (lib / BROKER_JAR).is_file():  # another process fetched them
            verify_jars(lib, manifest, remedy=_refetch_hint(root))
            return lib
        (progress or logger.info)(
            f"fetching Apache Kafka {KAFKA_VERSION} jars with Maven (first time only)…"
        )
        partial = root / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-C",  # --strict-checksums: a download that fails its checksum fails the fetch
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            msg = "Maven did not finish fetching the Kafka jars within 15 minutes"
            raise ServiceError(msg) from None
        if proc.returncode != 0 or not (partial / BROKER_JAR).is_file():
            tail = _tail_text(proc.stdout + proc.stderr, 15)
            msg = f"Maven could not fetch the Kafka jars (exit {proc.returncode}):\n{tail}"
            raise ServiceError(msg)
        # before it becomes the cache; a mismatch here is the pom and the manifest disagreeing
        verify_jars(partial, manifest, remedy=REGENERATE_HINT)
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
        marker.write_text(f"kafka {KAFKA_VERSION}\n")
    return lib


def read_manifest(manifest: Path) -> dict[str, str]:
    """Jar name → SHA-256 from `manifest` (`sha256sum` format; `#` lines are comments)."""
    pinned: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
            msg = f"{manifest}:{number}: expected `<sha256>  <jar name>`, got {line!r}"
            raise ServiceError(msg)
        pinned[fields[1].removeprefix("*")] = fields[0].lower()
    return pinned


def verify_jars(lib: Path, manifest: Path = MANIFEST, *, remedy: str | None = None) -> None:
    """Refuse `lib` unless its jars are exactly those of `manifest`, byte for byte.

    The broker's classpath is `lib/*`, so a jar the manifest does not name is refused as
    firmly as a changed one. One line names the first bad jar and `remedy` (by default:
    delete the cache so the next start fetches the jars again).
    """
    try:
        pinned = read_manifest(manifest)
    except OSError as exc:
        msg = f"cannot read the Kafka jar manifest {manifest}: {exc.strerror}"
        raise ServiceError(msg) from None
    present = _classpath_jars(lib)
    problems = [f"{name} is not in {manifest.name}" for name in sorted(present.keys() - pinned)]
    problems += [f"{name} is missing" for name in sorted(pinned.keys() - present.keys())]
    problems += [
        f"{name} does not match its SHA-256 in {manifest.name}"
        for name in sorted(present.keys() & pinned.keys())
        if _sha256(present[name]) != pinned[name]
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        msg = f"Kafka jars in {lib} refused: {problems[0]}{more}; {remedy or _refetch_hint(lib)}"
        raise ServiceError(msg)


def _refetch_hint(cache: Path) -> str:
    return f"delete {cache} so the next start fetches them again"


def _classpath_jars(lib: Path) -> dict[str, Path]:
    """What the JVM loads from `-cp lib/*`: every file whose name ends in .jar or .JAR."""
    return {
        path.name: path
        for path in lib.iterdir()
        if path.suffix in (".jar", ".JAR") and path.is_file()
    }


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# -- broker files -----------------------------------------------------------------------


def kafka_dir(settings: Settings) -> Path:
    return (settings.data_dir / "kafka").resolve()


@dataclass(frozen=True)
class BrokerSecurity:
    """What `kafka start --tls [--sasl]` adds to the plaintext broker.

    The bootstrap address becomes the TLS listener (`SSL`, or `SASL_SSL` with `admin`), the
    one clients use and the broker's own inter-broker listener; the controller listener stays
    on the controller port of the same host: plaintext with TLS alone, SASL_SSL (PLAIN, the
    admin's credentials) with SASL, so that with the authorizer on nothing reaches the
    controller anonymously. `admin` (username, password) is the super user, created with
    SCRAM-SHA-512 credentials when the storage is formatted.
    """

    tls: tls.TlsFiles
    admin: tuple[str, str] | None = None

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.admin else "SSL"


def render_server_properties(settings: Settings, security: BrokerSecurity | None = None) -> str:
    """The broker+controller configuration for `settings` (pure; unit-tested)."""
    host, port = settings.bootstrap_host_port
    cport = settings.controller_port
    home = kafka_dir(settings)
    listener = "PLAINTEXT" if security is None else security.protocol
    controller_protocol = "PLAINTEXT"
    if security is not None and security.admin is not None:
        controller_protocol = "SASL_SSL"
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{cport}",
        "listeners": f"{listener}://{host}:{port},CONTROLLER://{host}:{cport}",
        "advertised.listeners": f"{listener}://{host}:{port}",
        "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:{controller_protocol}",
        "inter.broker.listener.name": listener,
        "controller.listener.names": "CONTROLLER",
        "log.dirs": str(home / "data"),
        "num.partitions": str(settings.topic_partitions),
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
    }
    if security is not None:
        props |= _security_properties(security)
    lines = ["# written by keypulse kafka start; edits are overwritten", ""]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


SCRAM = "SCRAM-SHA-512"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"


def _security_properties(security: BrokerSecurity) -> dict[str, str]:
    props = {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(security.tls.keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(security.tls.ca_cert),
        "ssl.client.auth": "none",
    }
    if security.admin is None:
        return props
    user, password = security.admin
    jaas_user, jaas_password = _jaas_quote(user), _jaas_quote(password)
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
    props |= {
        "sasl.enabled.mechanisms": SCRAM,
        "sasl.mechanism.inter.broker.protocol": SCRAM,
        f"listener.name.sasl_ssl.{SCRAM.lower()}.sasl.jaas.config": (
            f"{scram} required username={jaas_user} password={jaas_password};"
        ),
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": (
            f"{plain} required username={jaas_user} password={jaas_password} "
            f"user_{user}={jaas_password};"
        ),
        "authorizer.class.name": AUTHORIZER,
        "super.users": f"User:{user}",
        "allow.everyone.if.no.acl.found": "false",
    }
    return props


def _jaas_quote(value: str) -> str:
    return f'"{value}"'


def check_admin(user: str, password: str) -> tuple[str, str]:
    """The SASL admin's credentials, refused (ConfigError) when missing or unusable in the
    broker's JAAS lines and `kafka-storage format --add-scram`."""
    if not user or not password:
        msg = (
            "kafka start --sasl needs the admin's credentials in KEYPULSE_KAFKA_SASL_USERNAME "
            "and KEYPULSE_KAFKA_SASL_PASSWORD"
        )
        raise ConfigError(msg)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", user):
        msg = f"KEYPULSE_KAFKA_SASL_USERNAME {user!r}: use letters, digits, '.', '_' or '-'"
        raise ConfigError(msg)
    # server.properties is read as ISO-8859-1 with backslash escapes; JAAS quotes with `"`;
    # --add-scram splits on `,` and `]`
    if re.search(r'["\\,\[\]\s]', password) or not (password.isascii() and password.isprintable()):
        msg = (
            "KEYPULSE_KAFKA_SASL_PASSWORD for kafka start --sasl must be printable ASCII "
            "without quotes, backslashes, commas, brackets or white space"
        )
        raise ConfigError(msg)
    return user, password


def new_cluster_id() -> str:
    """A random KRaft cluster id (Kafka's Uuid: 16 bytes, URL-safe base64, no padding)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _format_storage(
    java: str, lib: Path, home: Path, props: Path, admin: tuple[str, str] | None = None
) -> None:
    marker = home / "sasl.admin"  # the SASL admin the storage was formatted with
    if (home / "data" / "meta.properties").is_file():
        if admin is not None and _read(marker) != admin[0]:
            msg = (
                f"the Kafka storage in {home / 'data'} was formatted without the SASL admin "
                f"{admin[0]!r}; start --sasl with a new KEYPULSE_DATA_DIR, or delete "
                f"{home / 'data'} (its topics are lost)"
            )
            raise ConfigError(msg)
        return
    id_file = home / "cluster.id"
    if not id_file.is_file():
        id_file.write_text(new_cluster_id() + "\n")
    cluster_id = id_file.read_text().strip()
    cmd = [
        java,
        "-cp",
        f"{lib}/*",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        f"-Dkafka.logs.dir={home / 'logs'}",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(props),
        "--ignore-formatted",
    ]
    if admin is not None:
        cmd += ["--add-scram", f"{SCRAM}=[name={admin[0]},password={admin[1]}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        tail = _tail_text(proc.stdout + proc.stderr, 15)
        msg = f"formatting the Kafka storage in {home / 'data'} failed:\n{tail}"
        raise ServiceError(msg)
    if admin is not None:
        marker.write_text(admin[0] + "\n")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# -- process ----------------------------------------------------------------------------

# Popen objects of brokers this process started: kept so they are reaped, not zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _broker_pid(settings: Settings) -> int | None:
    """The pid in broker.pid if that process is alive and is this data dir's broker."""
    home = kafka_dir(settings)
    try:
        pid = int((home / "broker.pid").read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = proc.cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    if BROKER_MAIN in cmdline and str(home / "server.properties") in cmdline:
        return pid
    return None


def is_up(settings: Settings, timeout: float = 2.0) -> bool:
    """True if a broker answers a metadata request at `settings.kafka_bootstrap`."""
    try:
        _admin(settings).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start(
    settings: Settings,
    *,
    wait_seconds: float = 60,
    progress: Progress | None = None,
    tls_listener: bool = False,
    sasl: bool = False,
) -> str:
    """Start the broker detached (jars fetched, storage formatted if needed), create topics.

    `tls_listener`: the bootstrap address is a TLS listener (certificates made in
    `<data>/kafka/tls`); `sasl` (implies TLS): SASL_SSL with SCRAM-SHA-512 and the
    authorizer, the admin being KEYPULSE_KAFKA_SASL_USERNAME/PASSWORD (BrokerSecurity).
    """
    security: BrokerSecurity | None = None
    if tls_listener or sasl:
        security, settings = _secure(settings, sasl=sasl)
    bootstrap = settings.kafka_bootstrap
    tls_note = (
        ""
        if security is None
        else (
            f"; {security.protocol} listener, CA file {security.tls.ca_cert} (clients: "
            f"KEYPULSE_KAFKA_SECURITY_PROTOCOL={security.protocol} "
            f"KEYPULSE_KAFKA_SSL_CA_FILE={security.tls.ca_cert})"
        )
    )
    pid = _broker_pid(settings)
    if is_up(settings) or (pid is not None and _wait_up(settings, pid, wait_seconds)):
        owner = f" (pid {pid})" if pid is not None else ""
        created = ensure_topics(settings)  # also makes a compose or remote broker ready
        topics_note = f"; created topics {', '.join(created)}" if created else ""
        return f"Kafka already running at {bootstrap}{owner}{topics_note}{tls_note}"
    if pid is not None and _alive(pid):
        msg = (
            f"Kafka pid {pid} is running but does not answer at {bootstrap}; see "
            f"{kafka_dir(settings) / 'broker.out'}, or `keypulse kafka stop` it first"
        )
        raise ServiceError(msg)
    java = check_java()
    lib = ensure_jars(progress=progress)
    host, port = settings.bootstrap_host_port
    for taken in (port, settings.controller_port):
        if _port_taken(host, taken):
            msg = f"port {host}:{taken} is in use by a program that is not a Kafka broker"
            raise ServiceError(msg)

    home = kafka_dir(settings)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    if security is None:
        props.write_text(render_server_properties(settings))
    else:  # it holds the admin's password with SASL: its owner's only
        props.touch(mode=0o600)
        props.chmod(0o600)
        props.write_text(render_server_properties(settings, security))
    _format_storage(java, lib, home, props, None if security is None else security.admin)
    heap = f"{settings.kafka_heap_mb}m"
    cmd = [
        java,
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        f"-Dkafka.logs.dir={home / 'logs'}",
        "-cp",
        f"{lib}/*",
        BROKER_MAIN,
        str(props),
    ]
    out = home / "broker.out"
    with out.open("ab") as log:
        since = log.tell()  # this run's output starts here
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,
        )
    _children[child.pid] = child
    (home / "broker.pid").write_text(f"{child.pid}\n")
    logger.info("started Kafka pid %s, waiting for %s", child.pid, bootstrap)

    if not _wait_up(settings, child.pid, wait_seconds):
        if child.poll() is None:
            _terminate(child.pid, timeout=15)
            reason = f"did not answer at {bootstrap} within {wait_seconds:g} s"
        else:
            reason = f"exited with code {child.returncode}"
        (home / "broker.pid").unlink(missing_ok=True)
        msg = f"Kafka {reason}; last lines of {out}:\n{_tail_file(out, 20, since)}"
        raise ServiceError(msg)
    created = ensure_topics(settings)
    return (
        f"Kafka {KAFKA_VERSION} started at {bootstrap} (pid {child.pid}, controller port "
        f"{settings.controller_port}, data {home}); {len(created)} topics created{tls_note}"
    )


def _secure(settings: Settings, *, sasl: bool) -> tuple[BrokerSecurity, Settings]:
    """The broker's security for `start`, and the settings its own admin client uses: the
    TLS listener, trusting the CA just made (SASL: as the admin)."""
    admin = None
    if sasl:
        admin = check_admin(
            settings.kafka_sasl_username, settings.kafka_sasl_password.get_secret_value()
        )
    host, _port = settings.bootstrap_host_port
    files, _renewed = tls.ensure(kafka_dir(settings) / "tls", (host,))
    security = BrokerSecurity(files, admin)
    client = settings.model_copy(
        update={
            "kafka_security_protocol": security.protocol,
            "kafka_ssl_ca_file": files.ca_cert,
            "kafka_sasl_mechanism": SCRAM if sasl else settings.kafka_sasl_mechanism,
        }
    )
    return security, client


def _wait_up(settings: Settings, pid: int, wait_seconds: float) -> bool:
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return False
        if is_up(settings, timeout=1.0):
            return True
        time.sleep(0.5)
    return False


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate(pid: int, *, timeout: float) -> bool:
    """SIGTERM, wait up to `timeout`, then SIGKILL; True if it exited on SIGTERM."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            _children.pop(pid, None)
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait(timeout=10)
    return False


def stop(settings: Settings, *, timeout: float = 30) -> str:
    """Stop the broker this data dir started: SIGTERM, then SIGKILL after `timeout`."""
    pid = _broker_pid(settings)
    pid_file = kafka_dir(settings) / "broker.pid"
    if pid is None:
        pid_file.unlink(missing_ok=True)
        if is_up(settings, timeout=1.0):
            return (
                f"Kafka not running from {kafka_dir(settings)}; the broker at "
                f"{settings.kafka_bootstrap} was not started by keypulse, left alone"
            )
        return "Kafka not running"
    clean = _terminate(pid, timeout=timeout)
    pid_file.unlink(missing_ok=True)
    if clean:
        return f"Kafka stopped (pid {pid})"
    return f"Kafka killed (pid {pid}): no clean exit within {timeout:g} s"


def status(settings: Settings) -> str:
    """One line: what runs where."""
    pid = _broker_pid(settings)
    home = kafka_dir(settings)
    bootstrap = settings.kafka_bootstrap
    try:
        topics = [
            t for t in _admin(settings).list_topics(timeout=2.0).topics if not t.startswith("__")
        ]
    except KafkaException:
        topics = None
    if pid is None and topics is None:
        return f"Kafka not running (bootstrap {bootstrap}, data {home})"
    if pid is None:
        return (
            f"a Kafka broker not started by keypulse answers at {bootstrap}: "
            f"{len(topics or [])} topics"
        )
    if topics is None:
        secured = "ssl.keystore.location=" in (_read(home / "server.properties") or "")
        hint = (
            f"; it was started with a TLS listener: set KEYPULSE_KAFKA_SECURITY_PROTOCOL and "
            f"KEYPULSE_KAFKA_SSL_CA_FILE={home / 'tls' / 'ca.pem'}"
            if secured and settings.kafka_security_protocol == "PLAINTEXT"
            else ""
        )
        return (
            f"Kafka pid {pid} is running but does not answer at {bootstrap} "
            f"(starting, or see {home / 'broker.out'}){hint}"
        )
    return (
        f"Kafka {KAFKA_VERSION} running: pid {pid}, bootstrap {bootstrap}, controller port "
        f"{settings.controller_port}, data {home}, {len(topics)} topics"
    )


# -- topics -----------------------------------------------------------------------------


def ensure_topics(settings: Settings, *, timeout: float = 30) -> list[str]:
    """Create the missing topics of `core.topics` (prefixed); return the names created."""
    admin = _admin(settings)
    existing = _list_topics(admin, timeout)
    wanted: list[NewTopic] = []
    for spec in TOPICS:
        name = settings.topic(spec.name)
        partitions = settings.topic_partitions if spec.partitioned else 1
        if name in existing:
            if existing[name] != partitions:
                logger.warning(
                    "topic %s has %s partitions, settings say %s; left alone",
                    name,
                    existing[name],
                    partitions,
                )
            continue
        wanted.append(
            NewTopic(
                name, num_partitions=partitions, replication_factor=1, config=dict(spec.config)
            )
        )
    if not wanted:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            msg = f"creating Kafka topic {name} failed: {exc}"
            raise ServiceError(msg) from None
        created.append(name)
    _wait_for_leaders(admin, created, timeout)
    logger.info("created Kafka topics %s", ", ".join(created))
    return created


def delete_topics(settings: Settings, *, timeout: float = 30) -> list[str]:
    """Delete this prefix's topics (test cleanup); return the names deleted."""
    admin = _admin(settings)
    existing = _list_topics(admin, timeout)
    present = [name for name in (settings.topic(spec.name) for spec in TOPICS) if name in existing]
    if not present:
        return []
    for name, future in admin.delete_topics(present, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            msg = f"deleting Kafka topic {name} failed: {exc}"
            raise ServiceError(msg) from None
    return present


def describe_topic_configs(settings: Settings, name: str, *, timeout: float = 10) -> dict[str, str]:
    """The effective configuration of one topic (physical name)."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    admin = _admin(settings)  # keep a reference: a collected client cancels its futures
    try:
        entries = admin.describe_configs([resource])[resource].result(timeout=timeout)
    except KafkaException as exc:
        msg = f"describing Kafka topic {name} failed: {exc}"
        raise ServiceError(msg) from None
    return {key: entry.value for key, entry in entries.items()}


def _admin(settings: Settings) -> AdminClient:
    # librdkafka logs through `logging` (served on poll, which we never call for admin),
    # so an absent broker doesn't spray connection errors on stderr.
    return AdminClient(admin_config(settings, logger=logging.getLogger(f"{__name__}.rdkafka")))


def _list_topics(admin: AdminClient, timeout: float) -> dict[str, int]:
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        msg = f"Kafka metadata request failed: {exc}"
        raise ServiceError(msg) from None
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Wait until every partition of `names` has a leader, so clients can use them at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=timeout).topics
        if all(
            name in topics
            and topics[name].partitions
            and all(p.leader >= 0 for p in topics[name].partitions.values())
            for name in names
        ):
            return
        time.sleep(0.2)
    msg = f"Kafka topics {', '.join(names)} have no leader after {timeout:g} s"
    raise ServiceError(msg)


# -- helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _tail_file(path: Path, lines: int, since: int = 0) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(since)
            return _tail_text(handle.read().decode(errors="replace"), lines)
    except OSError:
        return "(no log)"

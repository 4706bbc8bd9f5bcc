"""The launcher's pure parts, its prerequisite checks and its jar trust; no broker, no Maven.

The jar tests build a small cache of their own (a few made-up jars and a manifest pinning
them) and a stand-in `mvn` that copies jars into the output directory it is given.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest

from core.errors import DependencyError, ServiceError
from core.settings import Settings, load
from infra.kafka import launcher

JARS = {launcher.BROKER_JAR: b"broker", "kafka-clients.jar": b"clients", "log4j.jar": b"log4j"}


@pytest.fixture
def unit_settings(tmp_path: Path) -> Settings:
    return load(
        dev=True, data_dir=tmp_path / "data", kafka_bootstrap="127.0.0.1:19092", topic_partitions=6
    )


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_missing_java_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java anywhere
    with pytest.raises(DependencyError) as info:
        launcher.check_java()
    message = str(info.value)
    assert message.startswith("Java 17+ not found on PATH: install a JDK 17 or newer")
    assert "\n" not in message


def test_old_java_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'openjdk version \"11.0.21\" 2023-10-17' >&2\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DependencyError, match=r"Java 11 at .*needs Java 17\+"):
        launcher.check_java()


def test_missing_maven_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DependencyError, match=r"^Maven \(mvn\) not found on PATH") as info:
        launcher.ensure_jars(cache=tmp_path / "cache")
    assert "\n" not in str(info.value)


def _write_jars(directory: Path, jars: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in jars.items():
        (directory / name).write_bytes(content)


def _manifest(path: Path, jars: dict[str, bytes]) -> Path:
    lines = [f"{hashlib.sha256(content).hexdigest()}  {name}" for name, content in jars.items()]
    path.write_text("# pinned by the test\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A fetched, complete jar cache whose jars match `manifest`."""
    root = tmp_path / "cache"
    _write_jars(root / "lib", JARS)
    (root / "lib.complete").write_text(f"kafka {launcher.KAFKA_VERSION}\n")
    return root


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return _manifest(tmp_path / "jars.sha256", JARS)


@pytest.fixture
def fake_mvn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An `mvn` on PATH that records its arguments and copies `<tmp>/central/*` as the fetch."""
    bin_dir, central = tmp_path / "bin", tmp_path / "central"
    bin_dir.mkdir()
    _write_jars(central, JARS)
    script = bin_dir / "mvn"
    script.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, shutil, sys\n"
        f"pathlib.Path({str(tmp_path / 'mvn.args')!r}).write_text('\\n'.join(sys.argv[1:]))\n"
        "out = [a.split('=', 1)[1] for a in sys.argv if a.startswith('-DoutputDirectory=')][0]\n"
        f"shutil.copytree({str(central)!r}, out)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return central


def _refusal(cache: Path, manifest: Path) -> str:
    with pytest.raises(ServiceError) as info:
        launcher.ensure_jars(cache=cache, manifest=manifest)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_jars_already_fetched_need_no_maven(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, manifest: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert launcher.ensure_jars(cache=cache, manifest=manifest) == cache / "lib"


def test_half_download_is_retried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, manifest: Path
) -> None:
    (cache / "lib.complete").unlink()  # the fetch did not finish
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DependencyError):
        launcher.ensure_jars(cache=cache, manifest=manifest)


def test_a_changed_jar_is_refused_in_one_line(cache: Path, manifest: Path) -> None:
    jar = cache / "lib" / "kafka-clients.jar"
    jar.write_bytes(b"clientz")  # same size, one byte differs
    message = _refusal(cache, manifest)
    assert message == (
        f"Kafka jars in {cache / 'lib'} refused: kafka-clients.jar does not match its SHA-256 "
        f"in jars.sha256; delete {cache} so the next start fetches them again"
    )


@pytest.mark.parametrize("name", ["extra.jar", "EXTRA.JAR"])  # the JVM's lib/* loads both
def test_a_jar_the_manifest_does_not_name_is_refused(
    cache: Path, manifest: Path, name: str
) -> None:
    (cache / "lib" / name).write_bytes(b"planted")
    assert f"refused: {name} is not in jars.sha256;" in _refusal(cache, manifest)


def test_a_missing_jar_is_refused(cache: Path, manifest: Path) -> None:
    (cache / "lib" / "log4j.jar").unlink()
    assert "refused: log4j.jar is missing;" in _refusal(cache, manifest)


def test_several_bad_jars_name_the_first_and_count_the_rest(cache: Path, manifest: Path) -> None:
    (cache / "lib" / "log4j.jar").unlink()
    (cache / "lib" / "kafka-clients.jar").write_bytes(b"tampered")
    (cache / "lib" / "extra.jar").write_bytes(b"planted")
    assert "refused: extra.jar is not in jars.sha256 (and 2 more);" in _refusal(cache, manifest)


def test_files_the_jvm_does_not_load_are_ignored(cache: Path, manifest: Path) -> None:
    (cache / "lib" / "README.txt").write_text("not on the classpath")
    (cache / "lib" / "nested.jar").mkdir()  # lib/* takes files only
    assert launcher.ensure_jars(cache=cache, manifest=manifest) == cache / "lib"


def test_a_malformed_manifest_line_names_itself(cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.sha256"
    bad.write_text("# comment\nnot-a-digest  kafka-clients.jar\n")
    with pytest.raises(ServiceError, match=r"bad\.sha256:2: expected `<sha256>  <jar name>`"):
        launcher.ensure_jars(cache=cache, manifest=bad)


def test_first_fetch_uses_strict_checksums_and_is_verified(
    fake_mvn: Path, tmp_path: Path, manifest: Path
) -> None:
    root = tmp_path / "fresh"
    lib = launcher.ensure_jars(cache=root, manifest=manifest)
    assert lib == root / "lib"
    assert sorted(p.name for p in lib.iterdir()) == sorted(JARS)
    args = (tmp_path / "mvn.args").read_text().splitlines()
    assert "-C" in args  # --strict-checksums
    assert "dependency:copy-dependencies" in args
    assert (root / "lib.complete").is_file()


def test_a_fetch_that_differs_from_the_manifest_never_becomes_the_cache(
    fake_mvn: Path, tmp_path: Path, manifest: Path
) -> None:
    (fake_mvn / "kafka-clients.jar").write_bytes(b"not what was pinned")
    root = tmp_path / "fresh"
    with pytest.raises(ServiceError) as info:
        launcher.ensure_jars(cache=root, manifest=manifest)
    assert "kafka-clients.jar does not match" in str(info.value)
    assert str(info.value).endswith(launcher.REGENERATE_HINT)  # refetching would not help
    assert not (root / "lib").exists()
    assert not (root / "lib.complete").exists()


def test_the_committed_manifest_pins_this_kafka_version() -> None:
    pinned = launcher.read_manifest(launcher.MANIFEST)
    assert launcher.BROKER_JAR in pinned
    assert f"kafka-clients-{launcher.KAFKA_VERSION}.jar" in pinned
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in pinned.values())
    pom = launcher.POM.read_text()
    assert f"<kafka.version>{launcher.KAFKA_VERSION}</kafka.version>" in pom
    assert pom.count("<checksumPolicy>fail</checksumPolicy>") == 2  # dependencies and plugins


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ("no version here", None),
    ],
)
def test_java_major(output: str, major: int | None) -> None:
    assert launcher.java_major(output) == major


def test_server_properties(unit_settings: Settings) -> None:
    props = _properties(launcher.render_server_properties(unit_settings))
    home = unit_settings.data_dir.resolve() / "kafka"
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["log.dirs"] == str(home / "data")
    assert props["num.partitions"] == "6"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"


def test_server_properties_controller_port_setting(tmp_path: Path) -> None:
    settings = load(
        dev=True, data_dir=tmp_path, kafka_bootstrap="localhost:9092", kafka_controller_port=29999
    )
    props = _properties(launcher.render_server_properties(settings))
    assert props["listeners"] == "PLAINTEXT://localhost:9092,CONTROLLER://localhost:29999"


def test_cluster_id_is_a_kafka_uuid() -> None:
    ids = {launcher.new_cluster_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_nothing_running_in_an_empty_data_dir(unit_settings: Settings) -> None:
    assert launcher._broker_pid(unit_settings) is None

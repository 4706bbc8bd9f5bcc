"""The launcher's pure parts and its prerequisite checks; no broker, no Maven."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import DependencyError
from core.settings import Settings, load
from infra.kafka import launcher


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


def test_jars_already_fetched_need_no_maven(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / launcher.BROKER_JAR).touch()
    (tmp_path / "lib.complete").touch()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert launcher.ensure_jars(cache=tmp_path) == lib


def test_half_download_is_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / launcher.BROKER_JAR).touch()  # no marker: the fetch did not finish
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DependencyError):
        launcher.ensure_jars(cache=tmp_path)


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

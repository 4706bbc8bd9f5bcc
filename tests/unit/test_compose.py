"""docker-compose.yml stays well-formed: images, healthchecks, volumes, local files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.kafka.launcher import KAFKA_VERSION

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose.get("services")
    assert isinstance(services, dict) and services
    return services


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


def test_every_service_has_a_pinned_image_and_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        image = service.get("image")
        assert isinstance(image, str) and ":" in image, f"{name}: image with a tag"
        assert not image.endswith(":latest"), name
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name}: healthcheck.test"


def _undeclared_volumes(compose: dict[str, Any]) -> list[str]:
    declared = set((compose.get("volumes") or {}).keys())
    return [
        f"{name}: volume {source} is not declared"
        for name, service in _services(compose).items()
        for source in _volume_sources(service)
        if not _is_path(source) and source not in declared
    ]


def _missing_local_files(compose: dict[str, Any]) -> list[str]:
    missing = []
    for name, service in _services(compose).items():
        paths = [s for s in _volume_sources(service) if _is_path(s)]
        env_file = service.get("env_file", [])
        paths += [env_file] if isinstance(env_file, str) else list(env_file)
        build = service.get("build")
        if isinstance(build, str):
            paths.append(build)
        elif isinstance(build, dict):
            paths.append(build.get("context", "."))
        missing += [f"{name}: {p}" for p in paths if not (REPO / Path(p).expanduser()).exists()]
    return missing


# Hand-made services that break both rules, so the checks are seen to fire: today's compose
# file has no local files at all, and a check that never sees a bad entry proves nothing.
BROKEN: dict[str, Any] = {
    "services": {
        "app": {
            "volumes": ["app-data:/data", "./no-such-dir:/x", {"source": "cache", "target": "/c"}],
            "env_file": ["./no-such.env"],
            "build": {"context": "./no-such-context"},
        },
        "web": {"build": "./no-such-build", "volumes": ["./docs:/docs:ro"]},
    },
    "volumes": {"app-data": {}},
}


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    assert _undeclared_volumes(compose) == []
    assert _undeclared_volumes(BROKEN) == ["app: volume cache is not declared"]


def test_local_files_exist(compose: dict[str, Any]) -> None:
    assert _missing_local_files(compose) == []
    assert _missing_local_files(BROKEN) == [
        "app: ./no-such-dir",
        "app: ./no-such.env",
        "app: ./no-such-context",
        "web: ./no-such-build",
    ]  # ./docs exists, so web's volume passes


def test_kafka_and_clickhouse_match_the_local_launcher(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    assert services["clickhouse"]["environment"]["CLICKHOUSE_DB"] == "keypulse"

"""Shared fixtures: settings for tests, and the real Kafka broker the session starts.

The test tier is derived here, not written in each file (tests/README.md): a test is
`integration` if it lives under tests/integration/ or requests `kafka` or `clickhouse_engine`,
directly or through another fixture such as `kafka_settings`. So `pytest -m "not integration"`
never starts a broker or opens the engine, wherever such a test lives.

Tests talk to a broker at KEYPULSE_KAFKA_BOOTSTRAP if it is set, else 127.0.0.1:19092, so a
developer's broker on 9092 is never touched. A broker that already answers there is reused;
one the session started is stopped when the session ends. Each test that asks for
`kafka_settings` gets its own topic prefix, so tests never see each other's messages.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.settings import Settings, load
from infra.kafka import launcher

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

REPO = Path(__file__).resolve().parent.parent
TEST_DATA_DIR = REPO / ".keypulse-test"
TEST_BOOTSTRAP = "127.0.0.1:19092"
INTEGRATION_DIR = REPO / "tests" / "integration"
# requesting one of these, directly or through other fixtures, makes a test integration
INTEGRATION_FIXTURES = frozenset({"kafka", "clickhouse_engine"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every integration test (the rule in the module docstring)."""
    for item in items:
        # `fixturenames` is the transitive closure: kafka_settings brings kafka with it
        fixtures = getattr(item, "fixturenames", ())
        if item.path.is_relative_to(INTEGRATION_DIR) or INTEGRATION_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load(
        dev=True,
        data_dir=TEST_DATA_DIR,
        kafka_bootstrap=os.environ.get("KEYPULSE_KAFKA_BOOTSTRAP", TEST_BOOTSTRAP),
    )


@pytest.fixture(scope="session")
def kafka(settings: Settings) -> Iterator[Settings]:
    """A broker answering at settings.kafka_bootstrap for the whole session."""
    started = False
    if not launcher.is_up(settings):
        launcher.start(settings, wait_seconds=120)
        started = True
    try:
        yield settings
    finally:
        if started:
            launcher.stop(settings)


@pytest.fixture
def topic_prefix() -> str:
    """A prefix of this test's own: `t<8 hex>.`."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def kafka_settings(kafka: Settings, topic_prefix: str) -> Iterator[Settings]:
    """Settings whose topics (core/topics.py, with this test's prefix) exist; deleted after."""
    prefixed = kafka.model_copy(update={"topic_prefix": topic_prefix})
    launcher.ensure_topics(prefixed)
    yield prefixed
    launcher.delete_topics(prefixed)


@pytest.fixture
def clickhouse_engine(tmp_path: Path) -> Iterator[Client]:
    """The real ClickHouse engine (chDB) in this test's own directory, not yet migrated."""
    from tests.integration.harness import embedded  # imports the engine's client: lazily

    with embedded(tmp_path / "clickhouse") as client:
        yield client

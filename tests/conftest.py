"""Shared fixtures: settings for tests, and the real Kafka broker the session starts.

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

import pytest

from core.settings import Settings, load
from infra.kafka import launcher

REPO = Path(__file__).resolve().parent.parent
TEST_DATA_DIR = REPO / ".keypulse-test"
TEST_BOOTSTRAP = "127.0.0.1:19092"


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
    """Settings whose topics (infra/topics.py, with this test's prefix) exist; deleted after."""
    prefixed = kafka.model_copy(update={"topic_prefix": topic_prefix})
    launcher.ensure_topics(prefixed)
    yield prefixed
    launcher.delete_topics(prefixed)

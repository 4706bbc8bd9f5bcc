"""Fixtures of the bridge tests: bridges served on ephemeral ports, stopped after the test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.settings import Settings, load
from tests.ws.harness import Server, start_bridge


@pytest.fixture
def unit_settings() -> Settings:
    """Dev settings for bridges without Kafka (kafka=False)."""
    return load(dev=True, topic_prefix=f"u{uuid.uuid4().hex[:8]}.", ws_max_connections_per_user=3,
                kafka_bootstrap="127.0.0.1:1")


@pytest.fixture
def bridges() -> Iterator[Callable[..., Server]]:
    """`bridges(settings, **options)` starts a bridge server; all are stopped after the test."""
    started: list[Server] = []

    def make(settings: Settings, **options: Any) -> Server:
        server = start_bridge(settings, **options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()

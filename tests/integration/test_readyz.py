"""`/readyz` on the API and on the bridge follows the broker: red (503, the reason naming Kafka)
when a broker of the test's own stops, green again when it is back; red naming ClickHouse when
the store does not answer, green on the real engine."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from clickhouse_connect.driver.client import Client

from api import create_app
from core.clickhouse import shared_client
from core.settings import Settings
from core.telemetry import Telemetry, clickhouse_probe, kafka_probe
from infra.kafka import launcher
from tests.api.live import LiveServer
from tests.ws.harness import start_bridge


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def readyz(url: str) -> tuple[int, dict[str, str]]:
    response = httpx.get(f"{url}/readyz", timeout=10)
    return response.status_code, response.json()


def wait_for_status(urls: list[str], status: int, timeout: float = 30) -> list[dict[str, str]]:
    """Each URL's /readyz answer once every one answers `status`."""
    deadline = time.monotonic() + timeout
    while True:
        answers = [readyz(url) for url in urls]
        if all(code == status for code, _ in answers):
            return [body for _, body in answers]
        assert time.monotonic() < deadline, answers
        time.sleep(0.2)


@pytest.fixture
def own_broker(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A broker of this test's own (its data in tmp_path, its own ports): stopped and started
    by the test, never the shared one."""
    own = settings.model_copy(update={
        "kafka_bootstrap": f"127.0.0.1:{free_port()}", "kafka_controller_port": free_port(),
        "data_dir": tmp_path, "kafka_heap_mb": 256, "topic_partitions": 1,
        "topic_prefix": "readyz."})
    launcher.start(own, wait_seconds=120)
    try:
        launcher.ensure_topics(own)
        yield own
    finally:
        launcher.stop(own)


@pytest.mark.slow  # two broker starts: ~30 s on an idle 2-core machine
def test_readyz_goes_red_when_the_broker_stops_and_green_when_it_returns(
        own_broker: Settings) -> None:
    own = own_broker
    api = create_app(own, telemetry=Telemetry(readiness=[kafka_probe(own)]))
    bridge = start_bridge(own, telemetry=Telemetry(readiness=[kafka_probe(own)]))
    try:
        with LiveServer(api) as server:
            urls = [server.url, f"http://127.0.0.1:{bridge.port}"]
            assert wait_for_status(urls, 200) == [{"status": "ready"}] * 2
            launcher.stop(own)
            down = wait_for_status(urls, 503)
            reason = f"kafka: no answer from {own.kafka_bootstrap} within 1 s"
            assert down == [{"status": "not_ready", "reason": reason}] * 2
            httpx.get(f"{server.url}/healthz", timeout=10).raise_for_status()  # alive though
            launcher.start(own, wait_seconds=120)
            assert wait_for_status(urls, 200, timeout=60) == [{"status": "ready"}] * 2
    finally:
        bridge.stop()


def test_readyz_names_a_clickhouse_that_does_not_answer(settings: Settings) -> None:
    gone = settings.model_copy(update={"clickhouse_dsn": f"http://127.0.0.1:{free_port()}"})
    app = create_app(gone, telemetry=Telemetry(
        readiness=[clickhouse_probe(lambda: shared_client(gone))]))
    with LiveServer(app) as server:
        status, body = readyz(server.url)
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["reason"].startswith(f"clickhouse: cannot reach ClickHouse at {gone.dsn}")


def test_readyz_is_green_on_the_real_engine(settings: Settings,
                                            clickhouse_engine: Client) -> None:
    app = create_app(settings, telemetry=Telemetry(
        readiness=[clickhouse_probe(lambda: clickhouse_engine, ttl=0)]))
    with LiveServer(app) as server:
        assert readyz(server.url) == (200, {"status": "ready"})
        clickhouse_engine.close()  # the process's client gone: nothing answers SELECT 1
        status, body = readyz(server.url)
    assert status == 503
    assert body["reason"].startswith("clickhouse: ")

"""`/metrics` on every process, read with the Prometheus client's own parser: the API, the
bridge (`keypulse ws`'s app) and the pipeline's own port. HELP and TYPE on every family,
counters, gauges and the histograms present, and moving after traffic."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from core.outputs import EVENT_ROWS_OUTPUT, USAGE_STATS_OUTPUT
from core.settings import Settings
from core.telemetry import Telemetry, kafka_probe
from keypulse.commands.pipeline import serve_telemetry
from pipeline.metrics import DESCRIBED as PIPELINE_DESCRIBED
from pipeline.metrics import PipelineMetrics
from tests.api.live import LiveServer
from tests.integration.harness import PipelineProcess, produce
from tests.ws import kafka_helpers as kh
from tests.ws.harness import Server, login, recv, start_bridge
from ws_bridge.stats import DESCRIBED as WS_DESCRIBED
from ws_bridge.stats import BridgeStats

Families = dict[str, Metric]


def scrape(url: str) -> Families:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for family in families.values():  # every family has its HELP and TYPE
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram", "unknown"), family.name
        assert f"# TYPE {_exposed(family)} " in response.text, family.name
    return families


def _exposed(family: Metric) -> str:
    return f"{family.name}_total" if family.type == "counter" else family.name


def value(families: Families, name: str, kind: str, **labels: str) -> float:
    family = families[name]
    assert family.type == kind, (name, family.type)
    suffix = "_total" if kind == "counter" else "_count" if kind == "histogram" else ""
    found = [s.value for s in family.samples
             if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, (name, labels, family.samples)
    return sum(found)


def process_metrics(families: Families) -> None:
    assert value(families, "process_cpu_seconds", "counter") > 0
    assert value(families, "process_resident_memory_bytes", "gauge") > 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = what()
        except (AssertionError, KeyError, httpx.HTTPError):
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_api_metrics_parse_and_the_request_histogram_moves(api_settings: Settings,
                                                               token: Callable[..., str]) -> None:
    app = create_app(api_settings, telemetry=Telemetry())
    with LiveServer(app) as server:
        before = scrape(server.url)
        process_metrics(before)
        assert "keypulse_api_request_duration_seconds" in before  # declared, no sample yet
        headers = {"Authorization": f"Bearer {token('user-1')}"}
        for _ in range(3):
            httpx.get(f"{server.url}/v1/usage/summary", headers=headers, timeout=10)
        httpx.get(f"{server.url}/v1/usage/summary", timeout=10)  # 401
        after = scrape(server.url)
    histogram = "keypulse_api_request_duration_seconds"
    assert value(after, histogram, "histogram", route="/v1/usage/summary", status="4xx",
                 method="GET") >= 1
    assert value(after, histogram, "histogram", route="/metrics", status="2xx") >= 1
    assert value(after, histogram, "histogram", route="/v1/usage/summary") == 4
    buckets = [s for s in after[histogram].samples if s.name.endswith("_bucket")
               and s.labels["route"] == "/v1/usage/summary"]
    assert any(s.labels["le"] == "+Inf" for s in buckets)


def test_the_bridge_serves_health_readiness_and_metrics_beside_its_socket(
        kafka_settings: Settings) -> None:
    telemetry = Telemetry(readiness=[kafka_probe(kafka_settings)])
    server = start_bridge(kafka_settings, telemetry=telemetry)
    try:
        _bridge_metrics(server, kafka_settings)
    finally:
        server.stop()


def _bridge_metrics(server: Server, kafka_settings: Settings) -> None:
    url = f"http://127.0.0.1:{server.port}"
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz", timeout=10).json() == {"status": "ready"}
    assert httpx.get(f"{url}/nothing", timeout=10).status_code == 404
    assert httpx.post(f"{url}/metrics", timeout=10).status_code == 405
    before = scrape(url)
    process_metrics(before)
    assert value(before, "keypulse_ws_connections", "gauge") == 0
    delivered_before = value(before, "keypulse_ws_delivery_seconds", "histogram")
    producer = kh.TestProducer(kafka_settings)

    async def main() -> Families:
        ws, _ = await login(server.url, kafka_settings, "alice")
        for n in range(3):
            producer.send("notifications", "alice", kh.notification("alice", n))
            producer.flush()
            frame, _ = await recv(ws, timeout=15)
            assert frame.event == "new_notification"
        during = await asyncio.get_running_loop().run_in_executor(None, scrape, url)
        await ws.close()
        return during

    during = asyncio.run(main())
    assert value(during, "keypulse_ws_connections", "gauge") == 1
    assert value(during, "keypulse_ws_connected_users", "gauge") == 1
    assert value(during, "keypulse_ws_connections_opened", "counter") >= 1
    assert value(during, "keypulse_ws_messages_routed", "counter") >= 3
    assert value(during, "keypulse_ws_frames_out", "counter") >= 4  # authenticated + 3
    assert value(during, "keypulse_ws_delivery_seconds", "histogram") >= delivered_before + 1
    total = [s.value for s in during["keypulse_ws_delivery_seconds"].samples
             if s.name.endswith("_sum")]
    assert 0 < total[0] < 60  # seconds since each batch's Kafka timestamp: small, not ms


def _events(count: int) -> list[tuple[bytes | None, bytes]]:
    now_ms = int(time.time() * 1000)
    return [(b"u1", msgspec.json.encode({
        "event_id": uuid.uuid4().hex, "ts": now_ms - 1000 + i, "user_id": "u1",
        "api_key_id": "k1", "service": "openai", "status_code": 200, "latency_ms": 5.0}))
        for i in range(count)]


def test_the_pipeline_serves_metrics_on_a_port_of_its_own(kafka_settings: Settings,
                                                          tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pipeline = PipelineProcess(kafka_settings, tmp_path,
                               KEYPULSE_PIPELINE_HTTP_PORT=str(port), KEYPULSE_HOST="127.0.0.1")
    pipeline.start()
    try:
        wait_for(lambda: scrape(url))
        produce(kafka_settings, "usage.events", _events(50))

        def stored() -> Families | None:
            pipeline.assert_alive()
            families = scrape(url)
            if value(families, "keypulse_pipeline_event_rows_written", "counter") < 50:
                return None
            return families

        families = wait_for(stored, timeout=120)
        assert httpx.get(f"{url}/readyz", timeout=10).json() == {"status": "ready"}
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        assert httpx.delete(f"{url}/readyz", timeout=10).status_code == 405
        assert httpx.get(f"{url}/nothing", timeout=10).status_code == 404
    finally:
        assert pipeline.stop() == 0
    process_metrics(families)
    assert value(families, "keypulse_pipeline_events_in", "counter") >= 50
    assert value(families, "keypulse_pipeline_insert_duration_seconds", "histogram",
                 table="usage_events_rows") >= 1
    assert value(families, "keypulse_pipeline_freshness_seconds", "histogram") >= 1
    assert value(families, "keypulse_pipeline_read_to_store_seconds", "histogram") >= 1
    assert value(families, "keypulse_pipeline_freshness_lag_seconds", "gauge") >= 0
    partitions = {s.labels["partition"] for s in families["keypulse_pipeline_batch_at"].samples}
    assert partitions == {str(p) for p in range(kafka_settings.topic_partitions)}


def test_a_taken_pipeline_port_is_logged_and_the_dataflow_runs(kafka_settings: Settings,
                                                               tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        pipeline = PipelineProcess(kafka_settings, tmp_path,
                                   KEYPULSE_PIPELINE_HTTP_PORT=str(port))
        pipeline.start()
        try:
            wait_for(lambda: "the pipeline runs without them" in pipeline.log.read_text())
            wait_for(lambda: "reading " in pipeline.log.read_text())
            pipeline.assert_alive()
        finally:
            assert pipeline.stop() == 0


# -- the parts' descriptions ---------------------------------------------------------------------


def _row(ts_ms: int, ingested_ms: int) -> bytes:
    row: list[object] = [""] * len(EVENT_ROWS_OUTPUT.columns)
    row[EVENT_ROWS_OUTPUT.columns.index("ts_ms")] = ts_ms
    row[EVENT_ROWS_OUTPUT.columns.index("ingested_ms")] = ingested_ms
    return msgspec.json.encode(row) + b"\n"


def test_an_insert_dates_its_batch_by_its_first_row() -> None:
    counters = PipelineMetrics()
    now_ms = int(time.time() * 1000)
    counters.record_insert(2, 0, 0.03, events=_row(now_ms - 60_000, now_ms - 2_000)
                           + _row(now_ms, now_ms))
    counters.record_insert(0, 5, 0.01)
    counters.record_insert(1, 0, 0.02, events=b"not json\n")  # no freshness, no failure
    families = {f.name: f for f in counters.exposition()}

    def sample(name: str, suffix: str, **labels: str) -> float:
        return next(s.value for s in families[name].samples
                    if s.name == name + suffix and s.labels.items() >= labels.items())

    insert = "keypulse_pipeline_insert_duration_seconds"
    assert sample(insert, "_count", table=EVENT_ROWS_OUTPUT.table) == 2
    assert sample(insert, "_count", table=USAGE_STATS_OUTPUT.table) == 1
    assert sample("keypulse_pipeline_freshness_seconds", "_count") == 1
    assert 60 <= sample("keypulse_pipeline_freshness_seconds", "_sum") < 70
    assert 2 <= sample("keypulse_pipeline_read_to_store_seconds", "_sum") < 12
    assert sample("keypulse_pipeline_event_rows_written", "_total") == 3


def test_every_number_of_the_pipeline_and_the_bridge_is_described() -> None:
    """Typed, with a HELP line: an undescribed one would be served untyped (still there)."""
    snapshot = PipelineMetrics().snapshot()
    numbers = {k for k, v in snapshot.items() if isinstance(v, int | float | dict)}
    assert numbers <= set(PIPELINE_DESCRIBED), numbers - set(PIPELINE_DESCRIBED)
    bridge = {**BridgeStats().snapshot(), "connections": 0, "connected_users": 0}
    assert set(bridge) == set(WS_DESCRIBED)


def test_each_pipeline_process_serves_on_the_base_port_plus_its_id(
        kafka_settings: Settings) -> None:
    port = free_port()
    settings = kafka_settings.model_copy(update={
        "pipeline_http_port": port - 1, "clickhouse_dsn": f"http://127.0.0.1:{free_port()}"})
    assert serve_telemetry(settings.model_copy(update={"pipeline_http_port": 0}), 1) is None
    server = serve_telemetry(settings, 1)
    assert server is not None and server.port == port
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        first = httpx.get(f"{url}/readyz", timeout=10)  # the first look opens the store
        assert first.status_code == 503
        assert first.json()["reason"].startswith("clickhouse: ")  # opening, or refused
        reason = f"clickhouse: cannot reach ClickHouse at {settings.clickhouse_dsn}"
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=10).json()["reason"].startswith(
            reason), timeout=30)
        assert "process_cpu_seconds" in scrape(url)
    finally:
        server.__exit__()

"""Administration on the real engine: `GET /v1/admin/tables`, `GET /v1/admin/system` (the system
snapshot, the same as the WebSocket's `system_stats`) and the end of the open
`/api/system/stats`. The audit trail is in test_audit.py."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import create_app
from api.deps import get_clickhouse
from api.routes import admin
from core import metrics, system
from core.clock import ManualClock
from core.kafka import producer_config
from core.settings import Settings
from core.system import SystemSnapshots
from core.telemetry import Telemetry
from core.topics import USAGE_EVENTS
from infra.clickhouse.migrate import migrate
from pipeline.metrics import PipelineMetrics
from pipeline.windows import NEG_INF
from schemas.system import ClickHouseStats, KafkaSource, PipelineSource, SystemSnapshot
from tests.api.live import LiveServer
from tests.api.usage_rows import Event, seed
from tests.ws.harness import expect, login, send
from ws_bridge import create_bridge

ADMIN_ROUTES = ("/v1/admin/tables", "/v1/admin/system", "/v1/admin/audit")
FIELDS = {field.name for field in msgspec.structs.fields(SystemSnapshot)}


def _no_clickhouse() -> None:
    raise AssertionError("ClickHouse opened before the caller was authorised")


def _admin(token: Callable[..., str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token('root', roles=('admin',))}"}


@pytest.fixture
def parts() -> Iterator[Callable[[str, metrics.Provider], None]]:
    """`parts(name, provider)`: registers a metrics provider for the test, then puts back
    whatever was registered under that name before."""
    before = metrics.parts()
    touched: set[str] = set()

    def register(name: str, provider: metrics.Provider) -> None:
        touched.add(name)
        metrics.register(name, provider)

    yield register
    for name in touched:
        metrics.unregister(name)
        if name in before:
            metrics.register(name, before[name].provider, before[name].exposition)


@pytest.mark.parametrize("path", ADMIN_ROUTES)
@pytest.mark.parametrize(("roles", "status"), [(None, 401), (("user",), 403),
                                                (("analyst",), 403), (("service",), 403),
                                                (("ingest",), 403)])
def test_only_admins_reach_the_store(app: FastAPI, token: Callable[..., str], path: str,
                                     roles: tuple[str, ...] | None, status: int) -> None:
    app.dependency_overrides[get_clickhouse] = _no_clickhouse
    headers = {} if roles is None else {"Authorization": f"Bearer {token(roles=roles)}"}
    with TestClient(app) as client:
        response = client.get(path, headers=headers)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"code", "message"}
    assert (response.headers.get("www-authenticate") == "Bearer") == (status == 401)


def test_the_open_system_stats_are_gone(app: FastAPI, token: Callable[..., str]) -> None:
    with TestClient(app) as client:
        for headers in ({}, _admin(token)):
            response = client.get("/api/system/stats", headers=headers)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
    assert not [path for path in app.openapi()["paths"] if path.startswith("/api/")]


def test_admins_see_every_table_with_its_row_count(
    app: FastAPI, api_settings: Settings, token: Callable[..., str], clickhouse_engine: Client
) -> None:
    store = clickhouse_engine
    migrate(store, api_settings)
    store.command(
        "INSERT INTO keypulse.notifications (notification_id, user_id, created_at) "
        "VALUES ('n1', 'u1', now64(3)), ('n2', 'u1', now64(3)), ('n3', 'u2', now64(3))")
    tables = {row[0] for row in store.query(
        "SELECT name FROM system.tables WHERE database = 'keypulse'").result_rows}
    app.dependency_overrides[get_clickhouse] = lambda: store
    with TestClient(app) as client:
        response = client.get("/v1/admin/tables", headers=_admin(token))
    assert response.status_code == 200
    body = response.json()
    assert body["next_cursor"] is None
    rows = {item["table"]: item["rows"] for item in body["items"]}
    assert set(rows) == tables
    assert {"usage_events", "usage_stats", "alerts", "notifications"} <= tables
    assert rows["notifications"] == 3
    assert rows["usage_stats"] == 0
    assert [item["table"] for item in body["items"]] == sorted(tables)


# -- the system snapshot over HTTP ---------------------------------------------------------


def test_the_system_snapshot_without_a_pipeline(
    app: FastAPI, api_settings: Settings, clock: ManualClock, token: Callable[..., str],
    clickhouse_engine: Client, parts: Callable[[str, metrics.Provider], None],
) -> None:
    """An API alone: no bridge, no pipeline, a broker that does not answer (the fixture's);
    ClickHouse's figures are those of system.parts, which count() agrees with."""
    store = clickhouse_engine
    migrate(store, api_settings)
    now_ms = int(datetime.now(UTC).timestamp()) // 10 * 10_000  # real time: the TTLs keep rows
    clock.now = now_ms / 1000 + 30
    events = [Event(f"e{i}", now_ms - 10_000 * i - 1_500, "u1", "k1", "openai", 200, 12.5, "/x")
              for i in range(5)]
    seed(store, "keypulse", events)
    for batch in (("n1", "n2"), ("n3",)):  # two inserts: two parts
        store.insert("notifications", [[n, "u1", datetime.now(UTC)] for n in batch],
                     column_names=["notification_id", "user_id", "created_at"],
                     database="keypulse")
    parts("pipeline", lambda: {"events_in": 0})  # registered, but no partition has reported
    app.dependency_overrides[get_clickhouse] = lambda: store
    with TestClient(app) as client:
        response = client.get("/v1/admin/system", headers=_admin(token))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == FIELDS
    snapshot = msgspec.json.decode(response.content, type=SystemSnapshot)
    assert snapshot.at == datetime.fromtimestamp(clock.now, UTC)
    assert snapshot.process.pid == os.getpid()
    assert snapshot.process.memory_rss_bytes > 10 * 2**20
    assert 0 < snapshot.process.memory_percent < 100
    assert snapshot.process.uptime_s > 0 and snapshot.process.threads >= 1
    assert snapshot.process.cpu_percent >= 0
    assert snapshot.machine.cpu_count == os.cpu_count()
    assert 0 <= snapshot.machine.cpu_percent <= 100
    assert 0 < snapshot.machine.memory_available_bytes <= snapshot.machine.memory_total_bytes
    # what this process cannot measure is null, with the reason
    assert snapshot.websocket is None and "bridge" in snapshot.unavailable["websocket"]
    assert snapshot.kafka is None
    assert snapshot.unavailable["kafka"].startswith("Kafka did not answer")
    assert "no partition has reported" in snapshot.unavailable["pipeline.partitions"]
    # freshness from the store: the newest stored event and window
    pipeline = snapshot.pipeline
    assert pipeline is not None and pipeline.source is PipelineSource.CLICKHOUSE
    assert pipeline.watermark is None and "pipeline.watermark" in snapshot.unavailable
    newest = max(event.ts_ms for event in events)
    assert pipeline.newest_event == datetime.fromtimestamp(newest / 1000, UTC)
    assert pipeline.freshness_s == pytest.approx(clock.now - newest / 1000)
    window_end = newest // 10_000 * 10_000 + api_settings.window_seconds * 1000
    assert pipeline.newest_window_end == datetime.fromtimestamp(window_end / 1000, UTC)
    assert pipeline.window_freshness_s == pytest.approx(clock.now - window_end / 1000)
    assert pipeline.partitions == [] and pipeline.events_per_s is None
    # ClickHouse: every table, its rows as count() says, bytes and parts of its active parts
    assert snapshot.clickhouse is not None and snapshot.clickhouse.database == "keypulse"
    tables = {table.table: table for table in snapshot.clickhouse.tables}
    assert [table.table for table in snapshot.clickhouse.tables] == sorted(tables)
    assert {"usage_events", "usage_stats", "notifications", "audit_log"} <= set(tables)
    for name, table in tables.items():
        assert table.rows == store.command(f"SELECT count() FROM keypulse.`{name}`"), name
        assert table.parts == store.command(
            "SELECT count() FROM system.parts WHERE database = 'keypulse' AND active "
            f"AND table = '{name}'"), name
    assert tables["notifications"].rows == 3 and tables["notifications"].parts == 2
    assert tables["usage_events"].rows == 5
    assert tables["usage_events"].bytes_compressed > 0
    assert tables["usage_events"].bytes_uncompressed > 0
    assert tables["alerts"].rows == tables["alerts"].parts == tables["alerts"].bytes_compressed == 0


def test_the_snapshot_reads_the_pipeline_and_the_bridge_in_this_process(
    api_settings: Settings, parts: Callable[[str, metrics.Provider], None],
) -> None:
    """With the dataflow's metrics registered (its partitions reported): lag and rates per
    partition from its positions and the log ends it saw, its watermark and freshness; the
    bridge's connections from its provider. Rates need a second snapshot."""
    ticks = [1000.0]
    builder = SystemSnapshots(monotonic=lambda: ticks[0])
    now_s = 1_780_000_000.0
    pipeline = PipelineMetrics(events_in=1_000)
    pipeline.offsets.update({0: 900, 1: 400})
    pipeline.end_offsets.update({0: 1_000, 1: 400})
    pipeline.watermark_ms.update({0: int(now_s * 1000) - 20_000, 1: int(now_s * 1000) - 15_000,
                                  2: NEG_INF})  # partition 2: no event yet
    pipeline.max_event_ms.update({0: int(now_s * 1000) - 4_000, 1: int(now_s * 1000) - 2_000})
    pipeline.batch_at.update({0: now_s - 0.5, 1: now_s - 3})
    pipeline.caught_up.update({0: False, 1: True})
    parts("pipeline", pipeline.snapshot)
    bridge = {"connections": 3, "connected_users": 2, "messages_in": 50, "messages_skipped": 20,
              "frames_out": 70, "consumer_lag": -1}
    parts("ws", lambda: bridge)

    first = builder.snapshot(api_settings, now=now_s)
    kafka = first.kafka
    assert kafka is not None and kafka.source is KafkaSource.PIPELINE
    assert kafka.topic == api_settings.topic(USAGE_EVENTS)
    assert [(p.partition, p.position, p.log_end_offset, p.lag) for p in kafka.partitions] == [
        (0, 900, 1_000, 100), (1, 400, 400, 0)]
    assert kafka.lag == 100
    assert all(p.consumed_per_s is None for p in kafka.partitions)
    assert "rates" in first.unavailable
    assert first.clickhouse is None and "ClickHouse" in first.unavailable["clickhouse"]
    state = first.pipeline
    assert state is not None and state.source is PipelineSource.PIPELINE
    assert state.watermark == datetime.fromtimestamp(now_s - 20, UTC)  # the slowest partition
    assert state.watermark_lag_s == pytest.approx(20)
    assert state.freshness_s == pytest.approx(2)
    assert state.newest_window_end is None and "pipeline.newest_window_end" in first.unavailable
    assert [(p.partition, p.caught_up, p.idle_s) for p in state.partitions] == [
        (0, False, 0.5), (1, True, 3.0), (2, None, None)]
    assert state.partitions[2].watermark is None and state.partitions[2].newest_event is None
    assert first.websocket is not None
    assert (first.websocket.connections, first.websocket.users) == (3, 2)
    assert first.websocket.consumer_lag is None  # -1: the bridge does not know

    ticks[0] += 2.0
    pipeline.offsets[0] += 300
    pipeline.end_offsets[0] += 100
    pipeline.events_in += 300
    bridge.update(messages_in=150, frames_out=90)
    second = builder.snapshot(api_settings, now=now_s + 2)
    assert "rates" not in second.unavailable
    assert second.kafka is not None
    by_partition = {p.partition: p for p in second.kafka.partitions}
    assert (by_partition[0].consumed_per_s, by_partition[0].produced_per_s) == (150.0, 50.0)
    assert (by_partition[1].consumed_per_s, by_partition[1].produced_per_s) == (0.0, 0.0)
    assert by_partition[0].lag == 0
    assert second.pipeline is not None and second.pipeline.events_per_s == 150.0
    assert second.websocket is not None
    assert (second.websocket.messages_per_s, second.websocket.skipped_per_s,
            second.websocket.frames_out_per_s) == (50.0, 0.0, 10.0)


def test_kafka_log_ends_from_the_broker(kafka_settings: Settings) -> None:
    """No pipeline here: each partition's log end as the broker says, and its growth
    (produce rate); no lag, with the reason."""
    ticks = [0.0]
    builder = SystemSnapshots(monotonic=lambda: ticks[0], kafka_timeout=10)
    topic = kafka_settings.topic(USAGE_EVENTS)
    producer = Producer(producer_config(kafka_settings))

    def produce(count: int) -> None:
        for i in range(count):
            producer.produce(topic, b"{}", f"user-{i}".encode())
        assert producer.flush(10) == 0

    produce(5)
    first = builder.snapshot(kafka_settings, now=1_780_000_000.0)
    kafka = first.kafka
    assert kafka is not None and kafka.source is KafkaSource.BROKER and kafka.lag is None
    assert len(kafka.partitions) == kafka_settings.topic_partitions
    assert sum(p.log_end_offset or 0 for p in kafka.partitions) == 5
    assert all(p.position is None and p.lag is None for p in kafka.partitions)
    assert "recovery snapshots" in first.unavailable["kafka.lag"]
    produce(8)
    ticks[0] += 1.0  # cached: the same figures within CACHE_S
    cached = builder.snapshot(kafka_settings, now=1_780_000_001.0)
    assert cached.kafka == kafka
    ticks[0] += system.CACHE_S
    second = builder.snapshot(kafka_settings, now=1_780_000_006.0)
    assert second.kafka is not None
    assert sum(p.log_end_offset or 0 for p in second.kafka.partitions) == 13
    rates = [p.produced_per_s for p in second.kafka.partitions]
    assert None not in rates
    assert sum(r or 0.0 for r in rates) == pytest.approx(8 / (1.0 + system.CACHE_S), abs=0.05)


# -- the same snapshot on the WebSocket ------------------------------------------------------


def _keys(value: Any) -> Any:
    """The field names of an answer, nested (null sections and lists of rows compared by the
    names of their first row)."""
    if isinstance(value, dict):
        return {key: _keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_keys(value[0])] if value and isinstance(value[0], dict) else []
    return None


def test_system_stats_on_the_websocket_are_the_http_answer(
    api_settings: Settings, clock: ManualClock, token: Callable[..., str],
    clickhouse_engine: Client,
) -> None:
    """`keypulse run`'s shape: the API and a bridge in one process, one snapshot builder. The
    bridge's `system_stats` carries the fields `GET /v1/admin/system` answers, its
    connections included, and the store the API measures."""
    migrate(clickhouse_engine, api_settings)
    telemetry = Telemetry(process_metrics=False)  # one per process, as `keypulse run` makes it
    bridge = create_bridge(api_settings, kafka=False, monitor_interval=0.2, telemetry=telemetry)
    app = create_app(api_settings, routers=[bridge.router], lifespans=[bridge.lifespan],
                     clock=clock, telemetry=telemetry)
    app.dependency_overrides[get_clickhouse] = lambda: clickhouse_engine
    measured = admin.store(api_settings, lambda: clickhouse_engine)
    with LiveServer(app) as server:
        # the lifespan's registration would open the settings' own engine: ours instead
        telemetry.system.register_store(measured)
        try:
            url = server.url.replace("http://", "ws://") + "/ws"

            async def watch() -> dict[str, Any]:
                ws, _ = await login(url, api_settings, "root", "admin")
                await send(ws, "subscribe_monitoring")
                frames = []
                for _ in range(2):  # the first may come before the store was measured
                    frame, data = await expect(ws, "system_stats")
                    frames.append((frame, data))
                await ws.close()
                frame, data = frames[-1]
                assert isinstance(data, SystemSnapshot)
                assert data.websocket is not None and data.websocket.connections == 1
                assert data.clickhouse is not None
                return dict(msgspec.to_builtins(data))

            pushed = asyncio.run(watch())
            answer = httpx.get(f"{server.url}/v1/admin/system", headers=_admin(token),
                               timeout=10).json()
        finally:
            telemetry.system.unregister_store(measured)
    assert set(answer) == set(pushed) == FIELDS
    assert answer["websocket"] is not None and answer["clickhouse"] is not None
    answer.pop("unavailable"), pushed.pop("unavailable")  # reasons: rates may differ in time
    assert _keys(answer) == _keys(pushed)
    assert answer["clickhouse"]["tables"] == pushed["clickhouse"]["tables"]


def test_store_stats_are_cached(api_settings: Settings) -> None:
    """Polling is cheap: within CACHE_S the store is not asked again."""
    ticks = [0.0]
    builder = SystemSnapshots(monotonic=lambda: ticks[0], kafka_timeout=0.05)
    reads = []
    figures = system.StoreFigures(
        stats=ClickHouseStats(database="keypulse", measured_at=datetime.now(UTC), tables=[]),
        newest_event_ms=None, newest_window_end_ms=None)

    def read() -> system.StoreFigures:
        reads.append(1)
        return figures

    counted = system.Store(key=(uuid.uuid4().hex,), read=read)
    for _ in range(3):
        assert builder.snapshot(api_settings, now=0.0, store=counted).clickhouse is not None
    ticks[0] += system.CACHE_S
    builder.snapshot(api_settings, now=0.0, store=counted)
    assert len(reads) == 2


def test_a_store_that_fails_is_null_with_the_reason(api_settings: Settings) -> None:
    builder = SystemSnapshots(kafka_timeout=0.05)

    def read() -> system.StoreFigures:
        msg = "Code: 999. DB::Exception: the disk is on fire"
        raise RuntimeError(msg)

    snapshot = builder.snapshot(api_settings, now=0.0, store=system.Store(key="down", read=read))
    assert snapshot.clickhouse is None
    assert snapshot.unavailable["clickhouse"] == (
        "ClickHouse did not answer: Code: 999. DB::Exception: the disk is on fire")
    assert snapshot.pipeline is None and "pipeline" in snapshot.unavailable

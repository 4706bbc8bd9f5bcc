"""Administration (role `admin`): what the store holds, the system now, and the audit trail.

    GET /v1/admin/tables   every table with its row count
    GET /v1/admin/system   the system snapshot (schemas/system.py, built by core/system.py),
                           the same as the WebSocket's `system_stats`
    GET /v1/admin/audit    who changed what, when, from where (audit_log), newest first

Reading is not audited; these routes change nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request

from api import queries
from api.deps import AdminDep, ClickHouseDep, SettingsDep
from api.params import FromQuery, ToQuery, decode_cursor, encode_cursor, open_range
from api.responses import MsgspecResponse, described, failures
from core.clickhouse import shared_client
from core.clock import Clock
from core.settings import Settings
from core.system import Store, StoreFigures, SystemSnapshots
from schemas.system import (
    ClickHouseStats,
    KafkaSource,
    KafkaStats,
    MachineStats,
    PartitionStats,
    PipelineSource,
    PipelineStats,
    ProcessStats,
    SystemSnapshot,
    TableStats,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"])

MAX_AUDIT_LIMIT = 1000
_CURSOR_KIND = "audit"  # a cursor names its route: another route's cursor is refused
_CURSOR: Any = tuple[Literal["audit"], int, str]  # (kind, at in epoch ms, audit_id)
_AUTH_FAILURES = {401: "no valid bearer token",
                  403: "the token does not hold the admin role"}

_TABLES = described(queries.TableList, description="every table, by name")
_TABLES[200]["content"]["application/json"]["example"] = {
    "items": [{"table": "usage_events", "rows": 120000}, {"table": "usage_stats", "rows": 5400}],
    "next_cursor": None,
}


@router.get("/tables", summary="tables and row counts",
            responses={**_TABLES, **failures(_AUTH_FAILURES)})
def tables(_user: AdminDep, client: ClickHouseDep, settings: SettingsDep) -> MsgspecResponse:
    """Every keypulse table with its row count (active parts: an estimate until merges of
    the ReplacingMergeTree tables settle)."""
    rows = queries.table_rows(client, settings.clickhouse_database)
    return MsgspecResponse(queries.TableList(items=rows))


# -- the system snapshot ------------------------------------------------------------------


def store(settings: Settings, client: Callable[[], Client]) -> Store:
    """The API's ClickHouse as the system snapshot measures it (cached by its DSN)."""
    database = settings.clickhouse_database

    def read() -> StoreFigures:
        return queries.store_figures(client(), database, settings.window_seconds * 1000)

    return Store(key=(settings.dsn, database), read=read)


@contextlib.contextmanager
def store_registered(settings: Settings, snapshots: SystemSnapshots) -> Iterator[None]:
    """While the app serves: this process's snapshots (a bridge's `system_stats` beside the
    API included) measure the API's ClickHouse."""
    registered = store(settings, functools.partial(shared_client, settings))
    snapshots.register_store(registered)
    try:
        yield
    finally:
        snapshots.unregister_store(registered)


def _example_snapshot() -> dict[str, Any]:
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    example = SystemSnapshot(
        at=at,
        process=ProcessStats(pid=4242, cpu_percent=37.5, memory_rss_bytes=412_000_000,
                             memory_percent=2.6, threads=31, uptime_s=86_400.0),
        machine=MachineStats(cpu_count=2, cpu_percent=41.0, memory_total_bytes=16_000_000_000,
                             memory_available_bytes=9_500_000_000, memory_percent=40.6),
        websocket=None,
        kafka=KafkaStats(topic="usage.events", source=KafkaSource.BROKER, lag=None, partitions=[
            PartitionStats(partition=0, log_end_offset=1_200_345, position=None, lag=None,
                           produced_per_s=812.5, consumed_per_s=None)]),
        pipeline=PipelineStats(source=PipelineSource.CLICKHOUSE, watermark=None,
                               watermark_lag_s=None, newest_event=at, freshness_s=1.8,
                               newest_window_end=at, window_freshness_s=12.0,
                               events_per_s=None, partitions=[]),
        clickhouse=ClickHouseStats(database="keypulse", measured_at=at, tables=[
            TableStats(table="usage_events", rows=120_000, bytes_compressed=3_100_000,
                       bytes_uncompressed=14_800_000, parts=6)]),
        unavailable={"websocket": "no WebSocket bridge runs in this process",
                     "kafka.lag": "the pipeline does not run in this process, and it keeps "
                                  "its positions in its recovery snapshots, not in Kafka",
                     "pipeline.watermark": "the pipeline does not run in this process"},
    )
    found: dict[str, Any] = msgspec.to_builtins(example)
    return found


_SYSTEM = described(SystemSnapshot, description="the system as this process sees it")
_SYSTEM[200]["content"]["application/json"]["example"] = _example_snapshot()


@router.get("/system", summary="the system now: process, machine, connections, Kafka, "
                               "pipeline, ClickHouse",
            responses={**_SYSTEM, **failures({
                **_AUTH_FAILURES,
                503: "the store cannot be opened; retry after `Retry-After` seconds"})})
def system(_user: AdminDep, request: Request, client: ClickHouseDep,
           settings: SettingsDep) -> MsgspecResponse:
    """This process's CPU, memory and uptime, the machine's; WebSocket connections and users
    (when a bridge runs here); `usage.events` per partition (the log end and its produce
    rate, and the pipeline's position, lag and consume rate when it runs here); the
    pipeline's watermark and freshness (its own figures when it runs here, else what the
    store holds); rows, bytes and active parts per table (cached a few seconds).

    A section this process cannot measure is `null`, with the reason in `unavailable`. The
    WebSocket's `system_stats` carries the same snapshot."""
    clock: Clock = request.app.state.clock
    snapshots: SystemSnapshots = request.app.state.telemetry.system
    snapshot = snapshots.snapshot(settings, now=clock(), store=store(settings, lambda: client))
    return MsgspecResponse(snapshot)


# -- the audit trail ----------------------------------------------------------------------


def _text_query(description: str, example: str) -> Any:
    return Query(description=description, examples=[example], min_length=1, max_length=256)


_AUDIT = described(queries.AuditList, description="audit records, newest first")


@router.get("/audit", summary="the audit trail: who changed what, when, from where",
            responses={**_AUDIT, **failures({
                400: "a bad `from`, `to` or `cursor` (the field says which)",
                422: "`limit` outside 1..1000, or a text filter empty or over 256 characters",
                **_AUTH_FAILURES,
                503: "the store is unreachable; retry after `Retry-After` seconds"})})
def audit(
    _user: AdminDep,
    client: ClickHouseDep,
    settings: SettingsDep,
    actor: Annotated[str | None, _text_query("who made the change (the token's `sub`)",
                                             "root")] = None,
    action: Annotated[str | None, _text_query(
        "an action (`alert_rule.create`), or a prefix ending in `.` (`alert_rule.`)",
        "alert_rule.")] = None,
    user_id: Annotated[str | None, _text_query("whose data the change touched (`*`: everyone)",
                                               "user-1")] = None,
    target: Annotated[str | None, _text_query("what was changed: a rule, key or notification "
                                              "id", "default:user-1:error_rate")] = None,
    from_: FromQuery = None,
    to: ToQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_LIMIT, description="records per page",
                                examples=[100])] = 100,
    cursor: Annotated[str | None, Query(
        max_length=512, description="`next_cursor` of the previous page",
        examples=[encode_cursor([_CURSOR_KIND, 1764590400000, "1b4e28ba-2fa1-4d3b-9e5f"])],
    )] = None,
) -> MsgspecResponse:
    """Audit records matching every filter given, in `[from, to)` when given (default: all
    of them), newest first by (`at`, `audit_id`), one per change (read FINAL).

    Keyset pagination: a page continues strictly below the previous one, so changes recorded
    meanwhile never shift or repeat later pages."""
    from_ms, to_ms = open_range(from_, to)
    before = None
    if cursor is not None:
        _kind, at_ms, audit_id = decode_cursor(cursor, _CURSOR)
        before = (at_ms, audit_id)
    found = queries.AuditFilter(actor=actor, action=action, user_id=user_id, target=target,
                                from_ms=from_ms, to_ms=to_ms)
    items, last = queries.audit_page(client, settings.clickhouse_database, found, limit, before)
    next_cursor = None if last is None else encode_cursor([_CURSOR_KIND, *last])
    return MsgspecResponse(queries.AuditList(items=items, next_cursor=next_cursor))


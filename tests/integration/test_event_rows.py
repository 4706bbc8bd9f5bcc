"""Event rows in the real engine: what ClickHouse stores is what the dataflow validated."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import astuple

from core.outputs import EVENT_ROWS_OUTPUT, insert
from core.settings import Settings
from infra.clickhouse.migrate import migrate
from pipeline.rows import EVENT_ROW_COLUMNS, encode_rows
from schemas.events import decode_event
from tests.integration.harness import embedded

pytestmark = pytest.mark.integration

NOW = int(time.time() * 1000) // 1000 * 1000  # inside the events TTL
BASE = {"ts": NOW, "user_id": "u", "api_key_id": "k", "service": "openai",
        "status_code": 200, "latency_ms": 1.5}

# Valid events in the forms an SDK may send them: each must land exactly as decoded.
CASES: list[bytes] = [
    json.dumps({"event_id": "plain", **BASE}).encode(),
    json.dumps({"event_id": "esc-é😀\n\"q", **BASE, "endpoint": "/v1/\u00e9"}).encode(),
    b'{"event\\u005fid": "escaped-key", ' + json.dumps(BASE).encode()[1:],
    json.dumps({"event_id": "unknown", **BASE, "extra": {"a": [1, {"b": None}]},
                "ts_ms": 1, "late": True}).encode(),
    b'  {\n "event_id" : "spaced" ,\n' + json.dumps(BASE).encode()[1:] + b"\n",
    json.dumps({"event_id": "nulls", **BASE, "endpoint": None, "method": None,
                "tokens_in": None, "cost_usd": 0.1, "region": None}).encode(),
    json.dumps({"event_id": "numbers", **BASE, "latency_ms": 1e2,
                "tokens_in": 2**53, "cost_usd": 1.0000000000000002, "method": "get"}).encode(),
    json.dumps({"event_id": "rfc3339", **BASE,
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S.1234+05:30", time.gmtime(NOW / 1000))
                }).encode(),
    b'{"event_id": "repeated", "latency_ms": 9, ' + json.dumps(BASE).encode()[1:],
    json.dumps({"event_id": "all", **BASE, "endpoint": "/v1/chat", "method": "POST",
                "tokens_in": 5, "tokens_out": 7, "cost_usd": 0.25, "request_bytes": 10,
                "response_bytes": 20, "error_type": "timeout", "region": "eu",
                "sdk": "py/1"}).encode(),
]
COLUMNS = ("event_id", "user_id", "api_key_id", "service", "status_code", "latency_ms",
           "endpoint", "method", "tokens_in", "tokens_out", "cost_usd", "request_bytes",
           "response_bytes", "error_type", "region", "sdk", "schema_version")


def expected(raw: bytes) -> tuple[Any, ...]:
    event = decode_event(raw)
    return (event.event_id, event.user_id, event.api_key_id, event.service, event.status_code,
            event.latency_ms, event.endpoint or "", (event.method or "").upper(),
            event.tokens_in, event.tokens_out, event.cost_usd, event.request_bytes,
            event.response_bytes, event.error_type or "", event.region or "",
            event.sdk or "", event.schema_version)


def test_rows_land_as_the_dataflow_decoded_them(settings: Settings, tmp_path: Path) -> None:
    rows = []
    for offset, raw in enumerate(CASES):
        event = decode_event(raw)
        rows.append((*astuple(event), event.ts_ms, offset % 2 == 1, 3, offset, NOW))
    with embedded(tmp_path / "ch") as client:
        migrate(client, settings)
        db = settings.clickhouse_database
        insert(client, EVENT_ROWS_OUTPUT, db, encode_rows(rows))
        got = client.query(
            f"SELECT {', '.join(COLUMNS)}, toUnixTimestamp64Milli(ts), late, kafka_partition, "
            f"kafka_offset FROM {db}.usage_events FINAL ORDER BY kafka_offset"
        ).result_rows
    assert len(got) == len(CASES)
    for offset, (raw, row) in enumerate(zip(CASES, got, strict=True)):
        event = decode_event(raw)
        assert tuple(row[: len(COLUMNS)]) == expected(raw), raw
        assert tuple(row[len(COLUMNS):]) == (event.ts_ms, offset % 2 == 1, 3, offset)


def test_ingest_table_columns_follow_the_row_layout(settings: Settings, tmp_path: Path) -> None:
    with embedded(tmp_path / "ch") as client:
        migrate(client, settings)
        names = [r[0] for r in client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} "
            "AND table = 'usage_events_rows' ORDER BY position",
            parameters={"db": settings.clickhouse_database},
        ).result_rows]
    assert tuple(names) == EVENT_ROW_COLUMNS  # positional: UsageEvent's field order, then ours


def test_rule_rows_land_with_their_millisecond_times(settings: Settings, tmp_path: Path) -> None:
    from core.outputs import ALERT_RULES_OUTPUT, rule_row
    from schemas.alerts import AlertRule, Metric, Op

    rules = [AlertRule(rule_id=f"r{i}", user_id="u1", name="errors", metric=Metric.ERROR_RATE,
                       op=Op.GT, threshold=0.25, service=None, version=3) for i in (1, 2)]
    rows = [rule_row(rules[0], deleted=False, updated_ms=NOW + 123),
            rule_row(rules[1], deleted=True, updated_ms=NOW + 456)]
    with embedded(tmp_path / "ch") as client:
        migrate(client, settings)
        db = settings.clickhouse_database
        insert(client, ALERT_RULES_OUTPUT, db, encode_rows(rows))
        got = client.query(f"SELECT rule_id, threshold, service, is_deleted, "
                           f"toUnixTimestamp64Milli(updated_at), schema_version "
                           f"FROM {db}.alert_rules ORDER BY updated_at").result_rows
    assert [tuple(r) for r in got] == [("r1", 0.25, None, 0, NOW + 123, 1),
                                       ("r2", 0.25, None, 1, NOW + 456, 1)]

"""`keypulse migrate` on the embedded ClickHouse engine: tables and columns of DESIGN §4."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client
from msgspec.structs import astuple

from core.outputs import EVENT_ROWS_OUTPUT, insert
from core.settings import load
from infra.clickhouse.migrate import load_migrations, migrate
from keypulse.cli import main
from pipeline.rows import encode_rows
from schemas.events import decode_event
from tests.integration.harness import embedded

pytestmark = pytest.mark.integration

DESIGN_COLUMNS = {
    "usage_events": {"event_id", "ts", "user_id", "api_key_id", "service", "status_code",
                     "latency_ms", "endpoint", "method", "tokens_in", "tokens_out", "cost_usd",
                     "request_bytes", "response_bytes", "error_type", "region", "sdk",
                     "schema_version"},
    "usage_stats": {"user_id", "service", "window_start", "window_end", "window_seconds",
                    "requests", "successes", "client_errors", "server_errors", "success_rate",
                    "error_rate", "server_error_rate", "latency_avg_ms", "latency_p50_ms",
                    "latency_p95_ms", "latency_p99_ms", "latency_max_ms", "tokens_in",
                    "tokens_out", "cost_usd"},
    "alerts": {"alert_id", "rule_id", "rule_name", "user_id", "service", "metric", "op",
               "threshold", "value", "severity", "state", "window_start", "window_end",
               "fired_at", "resolved_at", "message"},
    "alert_rules": {"rule_id", "user_id", "name", "metric", "op", "threshold", "service",
                    "for_windows", "resolve_windows", "min_requests", "severity", "enabled"},
    "notifications": {"notification_id", "user_id", "type", "title", "message", "created_at"},
}


def test_migrate_twice_second_is_a_no_op_and_tables_match_design(tmp_path: Path) -> None:
    settings = load(dev=True, data_dir=tmp_path, events_ttl_days=7)
    with embedded(tmp_path / "clickhouse") as client:
        first = migrate(client, settings, progress=lambda _line: None)
        second = migrate(client, settings, progress=lambda _line: None)
        columns = client.query(
            "SELECT table, name, type FROM system.columns WHERE database = 'keypulse'"
        ).result_rows
        ttl = client.query("SELECT create_table_query FROM system.tables WHERE "
                           "database = 'keypulse' AND name = 'usage_events'").result_rows[0][0]
        orders = dict(client.query("SELECT name, sorting_key FROM system.tables "
                                   "WHERE database = 'keypulse'").result_rows)
    assert first == [m.version for m in load_migrations(settings)]
    assert second == []
    by_table: dict[str, dict[str, str]] = {}
    for table, name, type_ in columns:
        by_table.setdefault(table, {})[name] = type_
    for table, wanted in DESIGN_COLUMNS.items():
        assert wanted <= set(by_table[table]), (table, wanted - set(by_table[table]))
        for name, type_ in by_table[table].items():
            if name == "ts" or name.endswith("_at") or name in ("window_start", "window_end"):
                assert "DateTime64(3, 'UTC')" in type_, (table, name, type_)
    for table in DESIGN_COLUMNS:
        assert orders[table].startswith("user_id"), (table, orders[table])  # tenant first
    assert "toIntervalDay(7)" in ttl
    assert "PARTITION BY toYYYYMM(ts)" in ttl  # monthly: no spread of event times breaks it


def test_a_changed_ttl_is_applied_by_the_repeatable_migration(tmp_path: Path) -> None:
    with embedded(tmp_path / "clickhouse") as client:
        migrate(client, load(dev=True, data_dir=tmp_path), progress=lambda _line: None)
        again = migrate(client, load(dev=True, data_dir=tmp_path, events_ttl_days=90),
                        progress=lambda _line: None)
        ttl = client.query("SELECT create_table_query FROM system.tables WHERE "
                           "database = 'keypulse' AND name = 'usage_events'").result_rows[0][0]
    assert again == ["R__events_ttl"]
    assert "toIntervalDay(90)" in ttl


def test_unreachable_dsn_is_one_line_and_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["migrate", "--dsn", "http://127.0.0.1:1/keypulse"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["keypulse migrate: cannot reach ClickHouse at http://127.0.0.1:1/keypulse: "
                   "Connection refused"]


def test_raw_events_move_to_monthly_partitions_with_their_rows_ttl_and_view(
    tmp_path: Path,
) -> None:
    """0006 on a database of the previous release: daily partitions, rows in them."""
    settings = load(dev=True, data_dir=tmp_path, events_ttl_days=7)
    db = settings.clickhouse_database
    day = 86_400_000
    now = int(time.time()) * 1000
    times = [now, now + day, now + 40 * day]  # three days, two or three months
    with embedded(tmp_path / "clickhouse") as client:
        old = migrate(client, settings, progress=lambda _line: None, target="0005")
        assert old[-2:] == ["0005", "R__events_ttl"]
        assert _partition_key(client, db) == "toYYYYMMDD(ts)"
        insert(client, EVENT_ROWS_OUTPUT, db, _rows(times, 0))

        applied = migrate(client, settings, progress=lambda _line: None)
        # the TTLs set again on the rebuilt tables; the rollups' retention once they exist
        assert applied == ["0006", "0007", "0008", "0009", "0010", "R__events_ttl", "R__rollup_ttl"]
        assert _partition_key(client, db) == "toYYYYMM(ts)"
        ttl = client.query("SELECT create_table_query FROM system.tables WHERE "
                           f"database = '{db}' AND name = 'usage_events'").result_rows[0][0]
        assert "toIntervalDay(7)" in ttl
        tables = {r[0] for r in client.query(
            f"SELECT name FROM system.tables WHERE database = '{db}'").result_rows}
        assert "usage_events_monthly" not in tables
        # The view that feeds usage_events writes into the new table.
        insert(client, EVENT_ROWS_OUTPUT, db, _rows([now + 2], 3))
        got = client.query(f"SELECT event_id, toUnixTimestamp64Milli(ts) FROM {db}.usage_events "
                           "FINAL ORDER BY ts").result_rows
    assert got == [("e0", now), ("e3", now + 2), ("e1", now + day), ("e2", now + 40 * day)]


def _partition_key(client: Client, db: str) -> str:
    return str(client.query("SELECT partition_key FROM system.tables WHERE "
                            f"database = '{db}' AND name = 'usage_events'").result_rows[0][0])


def _rows(times: list[int], first: int) -> bytes:
    rows = []
    for n, ts in enumerate(times, start=first):
        event = decode_event(json.dumps({"event_id": f"e{n}", "ts": ts, "user_id": "u",
                                         "api_key_id": "k", "service": "openai",
                                         "status_code": 200, "latency_ms": 1.0}).encode())
        rows.append((*astuple(event), ts, False, 0, n, ts))
    return encode_rows(rows)

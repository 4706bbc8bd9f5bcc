"""`keypulse migrate` on the embedded ClickHouse engine: tables and columns of DESIGN §4."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import load
from infra.clickhouse.migrate import load_migrations, migrate
from keypulse.cli import main
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

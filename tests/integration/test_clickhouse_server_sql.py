"""The SQL of the ClickHouse server path, parsed by the embedded engine (chDB): the migrations
rendered for a cluster and for a single server, the analyst user's statements, the server
client's settings, and the queries the API builds at run time (docs/clickhouse.md).

chDB has no server mode and no Keeper, so nothing here creates a replicated table or a user:
the engine's parser (`EXPLAIN AST`) and formatter (`formatQuerySingleLine`) check the text.
tests/integration/test_clickhouse_server.py runs it on a server when one is named.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from pydantic import SecretStr

from api import analytics, notifications, queries, usage_events
from api.params import Interval
from core.clickhouse import SERVER_SETTINGS
from core.errors import ServiceError
from core.settings import Settings, load
from infra.clickhouse.migrate import (
    REPLICA_NAME,
    REPLICA_PATH,
    analyst_statements,
    bookkeeping,
    ensure_analyst,
    load_migrations,
    migrate,
    on_cluster,
)

CLUSTER = "kp_cluster"
# every table keypulse stores rows in: each must be replicated on a cluster
REPLACING = {
    "schema_migrations",
    "usage_events",
    "usage_stats",
    "alerts",
    "alert_rules",
    "notifications",
    "notification_reads",
    "notification_deletes",
    "api_key_events",
    "audit_log",
    "usage_rollup_1m",
    "usage_rollup_1h",
    "usage_rollup_1d",
    "usage_events_monthly",
    "usage_stats_fine",
    "usage_rollup_1m_fine",
    "usage_rollup_1h_fine",
    "usage_rollup_1d_fine",
}
_CREATED = re.compile(r"^CREATE TABLE (?:IF NOT EXISTS )?\w+\.(\w+)")
_REPLICATED = re.compile(
    r"ENGINE = Replicated(\w+MergeTree)\('"
    + re.escape(REPLICA_PATH)
    + "', '"
    + re.escape(REPLICA_NAME)
    + r"'(?:, )?"
)


def _format(client: Client, statement: str) -> str:
    """The engine's own rendering of `statement` after parsing it (one line)."""
    return str(
        client.query(
            "SELECT formatQuerySingleLine({q:String})", parameters={"q": statement}
        ).result_rows[0][0]
    )


def _parses(client: Client, statement: str) -> None:
    rows = client.query(f"EXPLAIN AST {statement}").result_rows
    assert rows, statement


def test_every_migration_parses_for_a_cluster_and_for_a_single_server(
    clickhouse_engine: Client,
) -> None:
    """Both renderings parse; the cluster one differs from the single-server one, as the
    engine reads them, only by ON CLUSTER and the replicated engines' two first arguments."""
    settings = load(dev=True)
    statements = bookkeeping(settings.clickhouse_database) + [
        s for m in load_migrations(settings) for s in m.statements()
    ]
    replicated: dict[str, str] = {}
    null: set[str] = set()
    for statement in statements:
        clustered = on_cluster(statement, CLUSTER)
        _parses(clickhouse_engine, statement)
        _parses(clickhouse_engine, clustered)
        single, multi = _format(clickhouse_engine, statement), _format(clickhouse_engine, clustered)
        if single.startswith("INSERT"):
            assert multi == single
            continue
        assert f" ON CLUSTER {CLUSTER}" in multi
        unrendered = _REPLICATED.sub(r"ENGINE = \1(", multi).replace(f" ON CLUSTER {CLUSTER}", "")
        assert unrendered == single, (single, multi)
        if created := _CREATED.match(multi):
            if found := _REPLICATED.search(multi):
                replicated[created.group(1)] = found.group(1)
            elif "ENGINE = `Null`" in multi:
                null.add(created.group(1))
    assert set(replicated) == REPLACING
    assert set(replicated.values()) == {"ReplacingMergeTree"}
    # the raw events' entry tables stay Null: nothing is stored in them to replicate
    assert null == {"usage_events_ingest", "usage_events_rows"}


def test_the_analyst_statements_parse(clickhouse_engine: Client) -> None:
    for cluster in ("", CLUSTER):
        settings = load(dev=True).model_copy(
            update={"clickhouse_cluster": cluster, "clickhouse_analyst_password": SecretStr("pw")}
        )
        statements = analyst_statements(settings, salt="0a1b")
        assert len(statements) == 3
        for statement in statements:
            _parses(clickhouse_engine, statement)
            formatted = _format(clickhouse_engine, statement)
            assert (f"ON CLUSTER {CLUSTER}" in formatted) == bool(cluster)
        create = _format(clickhouse_engine, statements[0])
        assert "IDENTIFIED WITH sha256_hash BY '" in create
        assert "SALT '0a1b'" in create
        assert create.endswith("readonly = 1")
        assert _format(clickhouse_engine, statements[2]).endswith(
            "SELECT ON keypulse.* TO keypulse_analyst"
        )


def test_the_analyst_user_is_never_made_on_the_embedded_engine(
    clickhouse_engine: Client,
) -> None:
    lines: list[str] = []
    settings = load(dev=True)
    assert not ensure_analyst(clickhouse_engine, settings, progress=lines.append)
    assert lines == []  # no password: nothing to say
    with_password = settings.model_copy(update={"clickhouse_analyst_password": SecretStr("pw")})
    assert not ensure_analyst(clickhouse_engine, with_password, progress=lines.append)
    assert lines == [
        "analyst user keypulse_analyst skipped: the embedded engine has no users "
        "(it needs a ClickHouse server)"
    ]


def test_the_server_settings_exist_and_take_their_values(clickhouse_engine: Client) -> None:
    """The engine of this release knows every setting keypulse sends to a server, and takes
    the value keypulse sends (an older server is sent only those it knows)."""
    names = list(SERVER_SETTINGS)
    known = {
        name
        for (name,) in clickhouse_engine.query(
            "SELECT name FROM system.settings WHERE name IN {names:Array(String)}",
            parameters={"names": names},
        ).result_rows
    }
    assert known == set(names)
    read = "SELECT " + ", ".join(f"getSetting('{name}')" for name in names)
    default = clickhouse_engine.query(read).result_rows[0]
    values = clickhouse_engine.query(read, settings=SERVER_SETTINGS).result_rows[0]
    assert [int(v) if isinstance(v, bool) else v for v in values] == list(SERVER_SETTINGS.values())
    # this release inserts asynchronously unless told not to: the setting is not a no-op
    assert default[names.index("async_insert")] is True


class _Recorder:
    """The queries an API function sends through a real client, as sent."""

    def __init__(self, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        query = client.query

        def recording(sql: str, parameters: dict[str, Any] | None = None, **kwargs: Any) -> Any:
            self.sent.append((sql, dict(parameters or {})))
            return query(sql, parameters=parameters, **kwargs)

        monkeypatch.setattr(client, "query", recording)
        self.query = query


def test_the_api_queries_built_at_run_time_parse_and_name_their_database(
    clickhouse_engine: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A representative set: the analytics of each shape, a page of raw events, the
    notifications, the audit trail, the table list. A server client has no session database,
    so every table a query reads must be qualified (keypulse or system)."""
    settings: Settings = load(dev=True)
    db = settings.clickhouse_database
    migrate(clickhouse_engine, settings, progress=lambda _line: None)
    recorder = _Recorder(clickhouse_engine, monkeypatch)
    day = 86_400_000
    start = 1_767_225_600_000  # 2026-01-01
    span = analytics.Span(start + 3_600_000 + 10_000, start + 3 * day + 7_200_000)
    analytics.summary(clickhouse_engine, db, "u1", span)
    analytics.summary(clickhouse_engine, db, "u1", span, service="openai", fresh_ms=start)
    for interval in Interval:
        analytics.timeseries(
            clickhouse_engine,
            db,
            "u1",
            analytics.snap(span.from_ms, span.to_ms, interval.ms),
            interval,
        )
    for by in analytics.By:
        analytics.breakdown(clickhouse_engine, db, "u1", span, by)
    found = usage_events.EventFilter(
        "u1", start, start + day, service="openai", status_class=usage_events.StatusClass("5xx")
    )
    usage_events.events_page(clickhouse_engine, db, found, 50, (start + 5, "e9"))
    notifications.page(clickhouse_engine, db, "u1", 20, (start, "n1"), unread_only=True)
    notifications.unread_count(clickhouse_engine, db, "u1")
    queries.audit_page(
        clickhouse_engine,
        db,
        queries.AuditFilter(actor="a", action="rule.", from_ms=start, to_ms=start + day),
        10,
        (start, "x"),
    )
    queries.table_rows(clickhouse_engine, db)
    sent = recorder.sent
    assert len(sent) >= 12
    tables: set[str] = set()
    for sql, parameters in sent:
        ast = [
            row[0].strip()
            for row in recorder.query(f"EXPLAIN AST {sql}", parameters=parameters).result_rows
        ]
        named = [
            line.removeprefix("TableIdentifier ")
            for line in ast
            if line.startswith("TableIdentifier ")
        ]
        for name in named:
            assert name.startswith((f"{db}.", "system.")), (name, sql)
        tables.update(named)
    assert {
        f"{db}.usage_stats",
        f"{db}.usage_rollup_1h",
        f"{db}.usage_rollup_1d",
        f"{db}.usage_events",
        f"{db}.notifications",
        f"{db}.audit_log",
        "system.tables",
    } <= tables


def test_migrate_with_a_cluster_sends_the_cluster_rendering(clickhouse_engine: Client) -> None:
    """The embedded engine knows no cluster: the first statement `migrate` sends, rendered
    `ON CLUSTER`, is refused by name, and nothing was created."""
    settings = load(dev=True).model_copy(update={"clickhouse_cluster": CLUSTER})
    with pytest.raises(ServiceError, match=r"cannot prepare the migrations table: .*kp_cluster"):
        migrate(clickhouse_engine, settings, progress=lambda _line: None)
    databases = {
        name for (name,) in clickhouse_engine.query("SELECT name FROM system.databases").result_rows
    }
    assert settings.clickhouse_database not in databases

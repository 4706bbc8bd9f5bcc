"""The ClickHouse server path against a real server (docs/clickhouse.md).

Runs only when `KEYPULSE_TEST_CLICKHOUSE_URL` names one (`http(s)://user:pass@host:8123`, a
user allowed to create databases and users); `KEYPULSE_TEST_CLICKHOUSE_CLUSTER` also renders
the migrations for that cluster. Otherwise every test here is skipped with the reason, which
`pytest -ra` lists. Each run migrates a database of its own and drops it (and its analyst
user) afterwards. What needs no server is in tests/unit/test_clickhouse_server_sql.py and
tests/integration/test_clickhouse_server_sql.py.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse, urlunparse

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError
from msgspec.structs import astuple
from pydantic import SecretStr

from api import analytics
from core.clickhouse import connect
from core.outputs import EVENT_ROWS_OUTPUT, insert
from core.settings import Settings, load
from infra.clickhouse.migrate import ensure_analyst, load_migrations, migrate
from pipeline.rows import encode_rows
from schemas.events import decode_event

URL_VARIABLE = "KEYPULSE_TEST_CLICKHOUSE_URL"
CLUSTER_VARIABLE = "KEYPULSE_TEST_CLICKHOUSE_CLUSTER"
REFUSED = re.compile(r"Code: (164|497)\b")  # READONLY, ACCESS_DENIED
START = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture(scope="module")
def server_url() -> str:
    url = os.environ.get(URL_VARIABLE, "")
    if not url:
        pytest.skip(
            f"{URL_VARIABLE} is not set: the tests against a ClickHouse server did not "
            "run (docs/clickhouse.md)"
        )
    return url


@pytest.fixture
def server(server_url: str) -> Iterator[tuple[Client, Settings]]:
    """A client on the server and settings naming a database and an analyst of this test's
    own; both are dropped afterwards."""
    tag = uuid.uuid4().hex[:8]
    cluster = os.environ.get(CLUSTER_VARIABLE, "")
    settings = load(
        dev=True,
        clickhouse_dsn=server_url,
        clickhouse_database=f"kp_test_{tag}",
        clickhouse_cluster=cluster,
        clickhouse_analyst_user=f"kp_analyst_{tag}",
        clickhouse_analyst_password=f"pw-{uuid.uuid4().hex}",
    )
    client = connect(server_url)
    try:
        yield client, settings
    finally:
        where = f" ON CLUSTER {cluster}" if cluster else ""
        client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}{where} SYNC")
        client.command(f"DROP USER IF EXISTS {settings.clickhouse_analyst_user}{where}")
        client.close()


def _as(url: str, user: str, password: str) -> Client:
    """A plain clickhouse-connect client on the server as `user` (an analyst's own client)."""
    parsed = urlparse(url)
    return clickhouse_connect.get_client(
        host=parsed.hostname,
        port=parsed.port,
        interface=parsed.scheme,
        username=user,
        password=password,
    )


def _rows(count: int) -> bytes:
    rows = []
    for n in range(count):
        ts = START + n * 1000
        event = decode_event(
            json.dumps(
                {
                    "event_id": f"e{n}",
                    "ts": ts,
                    "user_id": "u1",
                    "api_key_id": "k",
                    "service": "openai",
                    "status_code": 500 if n % 4 == 0 else 200,
                    "latency_ms": 10.0 + n,
                    "endpoint": f"/v1/e{n % 2}",
                }
            ).encode()
        )
        rows.append((*astuple(event), ts, False, 0, n, ts))
    return encode_rows(rows)


def test_connect_sends_the_server_settings_without_a_session_database(server_url: str) -> None:
    """A DSN naming a database that does not exist yet still connects (`keypulse migrate`
    creates it), and the settings keypulse asks for are in effect."""
    missing = urlunparse(urlparse(server_url)._replace(path=f"/kp_missing_{uuid.uuid4().hex}"))
    client = connect(missing)
    try:
        assert not client.database
        async_insert, deduplicate = client.query(
            "SELECT getSetting('async_insert'), getSetting('insert_deduplicate')"
        ).result_rows[0]
        assert int(async_insert) == 0
        assert int(deduplicate) == 1
    finally:
        client.close()


def test_migrate_into_a_fresh_database_then_nothing_to_do(
    server: tuple[Client, Settings],
) -> None:
    client, settings = server
    db = settings.clickhouse_database
    first = migrate(client, settings, progress=lambda _line: None)
    assert first == [m.version for m in load_migrations(settings)]
    assert migrate(client, settings, progress=lambda _line: None) == []
    engines = {
        str(name): str(engine)
        for name, engine in client.query(
            "SELECT name, engine FROM system.tables WHERE database = {db:String}",
            parameters={"db": db},
        ).result_rows
    }
    assert {
        "usage_events",
        "usage_stats",
        "alerts",
        "alert_rules",
        "notifications",
        "schema_migrations",
        "usage_rollup_1d",
        "audit_log",
    } <= set(engines)
    stored = [name for name, engine in engines.items() if "MergeTree" in engine]
    assert len(stored) >= 13
    replicated = settings.clickhouse_cluster != ""
    for name in stored:
        assert engines[name].startswith("Replicated") == replicated, (name, engines[name])


def test_events_inserted_through_the_outputs_are_read_back_once(
    server: tuple[Client, Settings],
) -> None:
    """The sink's insert (core.outputs) into the Null entry table and its view, retried with
    the same bytes, then read as the API reads it."""
    client, settings = server
    db = settings.clickhouse_database
    migrate(client, settings, progress=lambda _line: None)
    data = _rows(8)
    insert(client, EVENT_ROWS_OUTPUT, db, data)
    insert(client, EVENT_ROWS_OUTPUT, db, data)  # a retry after a lost answer
    got = client.query(
        f"SELECT event_id FROM {db}.usage_events FINAL ORDER BY event_id"
    ).result_rows
    assert [r[0] for r in got] == [f"e{n}" for n in range(8)]
    span = analytics.Span(START, START + 60_000)
    by_endpoint = analytics.breakdown(client, db, "u1", span, analytics.By.ENDPOINT)
    assert {row.group: row.requests for row in by_endpoint.rows} == {"/v1/e0": 4, "/v1/e1": 4}


def test_the_analyst_reads_and_can_do_nothing_else(
    server: tuple[Client, Settings],
    server_url: str,
) -> None:
    client, settings = server
    db = settings.clickhouse_database
    migrate(client, settings, progress=lambda _line: None)
    insert(client, EVENT_ROWS_OUTPUT, db, _rows(3))
    lines: list[str] = []
    assert ensure_analyst(client, settings, progress=lines.append)
    assert lines == [f"analyst user {settings.clickhouse_analyst_user}: read-only on {db}"]
    user = settings.clickhouse_analyst_user
    password = settings.clickhouse_analyst_password.get_secret_value()
    analyst = _as(server_url, user, password)
    try:
        assert analyst.query(f"SELECT count() FROM {db}.usage_events FINAL").result_rows[0][0] == 3
        refused = [
            f"INSERT INTO {db}.alert_rules (rule_id, user_id) VALUES ('r', 'u')",
            f"CREATE TABLE {db}.mine (a String) ENGINE = Memory",
            f"DROP TABLE {db}.usage_events",
            "SELECT * FROM file('/etc/passwd', 'LineAsString')",
            "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
            "SELECT 1 SETTINGS max_result_rows = 0",
        ]
        for statement in refused:
            with pytest.raises(ClickHouseError, match=REFUSED):
                analyst.command(statement)
    finally:
        analyst.close()
    assert client.query(f"SELECT count() FROM {db}.alert_rules").result_rows[0][0] == 0

    # a rerun with a rotated password applies it
    rotated = settings.model_copy(
        update={"clickhouse_analyst_password": SecretStr(f"pw-{uuid.uuid4().hex}")}
    )
    assert ensure_analyst(client, rotated, progress=lambda _line: None)
    with pytest.raises(ClickHouseError, match=r"516|[Aa]uthentication"):
        _as(server_url, user, password).close()
    fresh = _as(server_url, user, rotated.clickhouse_analyst_password.get_secret_value())
    try:
        assert fresh.query("SELECT getSetting('readonly')").result_rows[0][0] == 1
    finally:
        fresh.close()
    # only salted hashes were sent: neither password is in the server's query log
    client.command("SYSTEM FLUSH LOGS")
    secrets = [password, rotated.clickhouse_analyst_password.get_secret_value()]
    logged = client.query(
        "SELECT count() FROM system.query_log WHERE hasAny(extractAll(query, '[A-Za-z0-9-]+'), "
        "{secrets:Array(String)})",
        parameters={"secrets": secrets},
    ).result_rows[0][0]
    assert logged == 0

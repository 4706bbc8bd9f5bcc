"""`/clickhouse/`: ClickHouse's HTTP interface, read-only, on the real engine (chDB)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import create_app
from api.deps import get_clickhouse
from core.auth import mint_token
from core.clock import ManualClock
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from tests.api.live import LiveServer
from tests.integration.harness import free_port

EVENTS = ("INSERT INTO keypulse.usage_events (event_id, ts, user_id, api_key_id, service, "
          "status_code, latency_ms, endpoint, method, ingested_at) VALUES "
          "('e1', now64(3), 'u1', 'k1', 'chat', 200, 12.5, '/v1/chat', 'POST', now64(3)),"
          "('e2', now64(3), 'u1', 'k1', 'chat', 500, 80, '/v1/chat', 'POST', now64(3)),"
          "('e3', now64(3), 'u2', 'k2', 'embed', 404, 3, '/v1/embed', 'POST', now64(3))")


@pytest.fixture
def sql_settings(tmp_path: Path) -> Settings:
    return load(dev=True, data_dir=tmp_path, clickhouse_dsn=f"chdb://{tmp_path / 'clickhouse'}",
                kafka_bootstrap="127.0.0.1:1")


@pytest.fixture
def store(clickhouse_engine: Client, sql_settings: Settings) -> Client:
    migrate(clickhouse_engine, sql_settings)
    clickhouse_engine.command(EVENTS)
    return clickhouse_engine


@pytest.fixture
def sql_app(sql_settings: Settings, store: Client) -> Iterator[FastAPI]:
    app = create_app(sql_settings, clock=ManualClock())
    app.dependency_overrides[get_clickhouse] = lambda: store
    yield app
    if (readonly := getattr(app.state, "sql_store", None)) is not None:
        readonly.close()


@pytest.fixture
def analyst(sql_settings: Settings, sql_app: FastAPI) -> Callable[..., str]:
    def make(*roles: str) -> str:
        return mint_token(sql_settings, "ana", roles=roles or ("analyst",), ttl_seconds=600,
                          clock=sql_app.state.clock)

    return make


@pytest.fixture
def http(sql_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(sql_app) as client:
        yield client


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- auth ------------------------------------------------------------------------------------

def _no_clickhouse() -> None:
    raise AssertionError("ClickHouse opened before the caller was authorised")


@pytest.mark.parametrize(("roles", "status"), [(None, 401), (("user",), 403),
                                                (("ingest",), 403)])
def test_only_analysts_and_admins_reach_the_store(
    app: FastAPI, token: Callable[..., str], roles: tuple[str, ...] | None, status: int
) -> None:
    app.dependency_overrides[get_clickhouse] = _no_clickhouse
    headers = {} if roles is None else _bearer(token(roles=roles))
    with TestClient(app) as client:
        response = client.post("/clickhouse/", content=b"SELECT 1", headers=headers)
        forged = client.get("/clickhouse/?query=SELECT+1",
                            headers={"Authorization": "Bearer not.a.token"})
    assert response.status_code == status
    assert forged.status_code == 401
    assert "WWW-Authenticate" in forged.headers


@pytest.mark.parametrize("role", ["analyst", "admin"])
def test_a_token_is_accepted_as_bearer_basic_password_or_key(
    http: TestClient, analyst: Callable[..., str], role: str
) -> None:
    token = analyst(role)
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    for headers in (_bearer(token), {"Authorization": f"Basic {basic}"},
                    {"X-ClickHouse-Key": token, "X-ClickHouse-User": "x"}):
        response = http.get("/clickhouse/", params={"query": "SELECT count() FROM usage_events"},
                            headers=headers)
        assert response.status_code == 200, response.text
        assert response.text == "3\n"


# -- the interface ---------------------------------------------------------------------------

def test_query_parameter_body_database_and_formats(http: TestClient,
                                                   analyst: Callable[..., str]) -> None:
    auth = _bearer(analyst())
    posted = http.post("/clickhouse/", content=b"SELECT user_id, count() FROM usage_events "
                       b"GROUP BY user_id ORDER BY user_id", headers=auth)
    assert posted.status_code == 200
    assert posted.text == "u1\t2\nu2\t1\n"
    assert posted.headers["X-ClickHouse-Format"] == "TabSeparated"
    assert posted.headers["Content-Type"].startswith("text/tab-separated-values")

    bare = http.get("/clickhouse?query=SELECT+1", headers=auth, follow_redirects=False)
    assert (bare.status_code, bare.text) == (200, "1\n")

    joined = http.post("/clickhouse/?query=SELECT+count()", content=b"FROM usage_events",
                       headers=auth)
    assert joined.text == "3\n"

    other_db = http.get("/clickhouse/", params={"query": "SELECT currentDatabase()",
                                                "database": "system"}, headers=auth)
    assert other_db.text == "system\n"

    as_json = http.get("/clickhouse/", params={"query": "SELECT 1 AS one",
                                               "default_format": "JSONEachRow"}, headers=auth)
    assert as_json.json() == {"one": 1}
    assert as_json.headers["X-ClickHouse-Format"] == "JSONEachRow"
    header = http.get("/clickhouse/", params={"query": "SELECT 1 AS one"},
                      headers={**auth, "X-ClickHouse-Format": "CSVWithNames"})
    assert header.text == '"one"\n1\n'
    own = http.get("/clickhouse/", params={"query": "SELECT 2 AS two FORMAT JSONEachRow;"},
                   headers=auth)
    assert own.json() == {"two": 2}
    assert own.headers["X-ClickHouse-Format"] == "JSONEachRow"


@pytest.mark.parametrize(("query", "status", "code"), [
    ("SELEC 1", 400, 62),
    ("SELECT * FROM nowhere", 404, 60),
    ("", 400, 62),
])
def test_bad_sql_is_a_clickhouse_style_4xx(http: TestClient, analyst: Callable[..., str],
                                           query: str, status: int, code: int) -> None:
    response = http.post("/clickhouse/", content=query.encode(), headers=_bearer(analyst()))
    assert response.status_code == status
    assert response.headers["X-ClickHouse-Exception-Code"] == str(code)
    assert re.match(rf"Code: {code}\. DB::Exception: ", response.text)


def test_bad_names_are_refused(http: TestClient, analyst: Callable[..., str]) -> None:
    auth = _bearer(analyst())
    assert http.get("/clickhouse/", params={"query": "SELECT 1", "database": "a;b"},
                    headers=auth).status_code == 400
    assert http.get("/clickhouse/", params={"query": "SELECT 1", "default_format": "x y"},
                    headers=auth).status_code == 400


# -- read-only at the engine -----------------------------------------------------------------

WRITES = [
    "INSERT INTO usage_events (event_id, user_id) VALUES ('x', 'u9')",
    "CREATE TABLE keypulse.evil (x UInt8) ENGINE = Memory",
    "DROP TABLE keypulse.usage_events",
    "ALTER TABLE keypulse.usage_events DELETE WHERE 1",
    "SELECT * FROM file('/etc/passwd')",
    "SELECT * FROM url('http://127.0.0.1:1/', CSV, 'a String')",
    "SELECT * FROM s3('http://127.0.0.1:1/b/k.csv', CSV, 'a String')",
    "SELECT * FROM remote('127.0.0.1:1', system.one)",
    "SET readonly = 0",
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT 1 SETTINGS max_result_rows = 0",
]


@pytest.mark.parametrize("query", WRITES)
def test_the_engine_refuses_writes_and_the_host(http: TestClient, analyst: Callable[..., str],
                                                store: Client, query: str) -> None:
    response = http.post("/clickhouse/?readonly=0&max_result_rows=0", content=query.encode(),
                         headers=_bearer(analyst("admin")))
    assert 400 <= response.status_code < 500, response.text
    assert response.text.startswith("Code: ")
    assert "root:" not in response.text
    tables = store.query("SELECT name FROM system.tables WHERE database = 'keypulse'")
    assert "evil" not in {row[0] for row in tables.result_rows}
    assert store.command("SELECT count() FROM keypulse.usage_events") == 3
    # the shared (writing) client is untouched
    store.command("INSERT INTO keypulse.notifications (notification_id, user_id, created_at) "
                  "VALUES ('n1', 'u1', now64(3))")


def test_result_and_time_limits(tmp_path: Path, clickhouse_engine: Client) -> None:
    settings = load(dev=True, data_dir=tmp_path, kafka_bootstrap="127.0.0.1:1",
                    clickhouse_dsn=f"chdb://{tmp_path / 'clickhouse'}", sql_max_result_rows=10,
                    sql_max_seconds=1)
    migrate(clickhouse_engine, settings)
    app = create_app(settings, clock=ManualClock())
    app.dependency_overrides[get_clickhouse] = lambda: clickhouse_engine
    auth = _bearer(mint_token(settings, "ana", roles=("analyst",), clock=app.state.clock))
    try:
        with TestClient(app) as client:
            many = client.post("/clickhouse/", content=b"SELECT number FROM numbers(100)",
                               headers=auth)
            slow = client.post("/clickhouse/", content=b"SELECT count() FROM numbers(10000000000)"
                               b" WHERE sleepEachRow(0) = 0", headers=auth)
            few = client.post("/clickhouse/", content=b"SELECT number FROM numbers(3)",
                              headers=auth)
    finally:
        app.state.sql_store.close()
    assert many.status_code == 400
    assert many.headers["X-ClickHouse-Exception-Code"] == "396"
    assert slow.status_code == 400
    assert slow.headers["X-ClickHouse-Exception-Code"] == "159"
    assert few.text == "0\n1\n2\n"


# -- real clients over a real server ---------------------------------------------------------

def test_clickhouse_connect_http_client_and_curl(sql_app: FastAPI,
                                                 analyst: Callable[..., str]) -> None:
    import clickhouse_connect

    token = analyst()
    with LiveServer(sql_app) as server:
        client = clickhouse_connect.get_client(
            host="127.0.0.1", port=server.port, username="analyst", password=token,
            proxy_path="/clickhouse", database="keypulse")
        try:
            assert client.ping()
            assert client.query("SELECT count() FROM keypulse.usage_events").result_rows == [(3,)]
            rows = client.query("SELECT user_id, count() AS n FROM usage_events "
                                "GROUP BY user_id ORDER BY user_id").result_rows
            assert rows == [("u1", 2), ("u2", 1)]
            with pytest.raises(Exception, match=r"READONLY|readonly"):
                client.command("DROP TABLE keypulse.usage_events")
        finally:
            client.close()

        curl = shutil.which("curl")
        if curl is None:
            pytest.skip("curl is not installed")
        url = f"http://127.0.0.1:{server.port}/clickhouse/"
        done = subprocess.run(
            [curl, "-sS", "-u", f"me:{token}", "--data-binary",
             "SELECT service, count() FROM usage_events GROUP BY service ORDER BY service", url],
            capture_output=True, text=True, timeout=30, check=True)
        assert done.stdout == "chat\t2\nembed\t1\n"
        refused = subprocess.run(
            [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
             f"Authorization: Bearer {analyst('user')}", "--data-binary", "SELECT 1", url],
            capture_output=True, text=True, timeout=30, check=True)
        assert refused.stdout == "403"


# -- keypulse sql ----------------------------------------------------------------------------




def test_keypulse_sql_asks_the_running_endpoint(store: Client, sql_settings: Settings,
                                                capsysbinary: pytest.CaptureFixture[bytes]
                                                ) -> None:
    import argparse

    from keypulse.commands import sql

    app = create_app(sql_settings)  # the system clock: the command mints at the real time
    app.dependency_overrides[get_clickhouse] = lambda: store
    with LiveServer(app) as server:
        args = argparse.Namespace(query="SELECT user_id FROM usage_events ORDER BY user_id",
                                  format="CSV", database=None, host="127.0.0.1",
                                  port=server.port)
        assert sql.run(args, sql_settings) == 0
        assert capsysbinary.readouterr().out == b'"u1"\n"u1"\n"u2"\n'
        args.query = "DROP TABLE usage_events"
        with pytest.raises(Exception, match=r"403 from .*Code: 164"):
            sql.run(args, sql_settings)
    app.state.sql_store.close()


def _keypulse(tmp_path: Path, *argv: str, dsn: str = "") -> subprocess.CompletedProcess[str]:
    import os
    import sys

    env = {**os.environ, "KEYPULSE_DEV": "1", "KEYPULSE_DATA_DIR": str(tmp_path / "kp"),
           "KEYPULSE_CLICKHOUSE_DSN": dsn, "KEYPULSE_PORT": str(free_port()),
           "KEYPULSE_HOST": "127.0.0.1"}
    return subprocess.run([sys.executable, "-m", "keypulse.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_keypulse_sql_opens_a_free_store_itself(tmp_path: Path) -> None:
    assert _keypulse(tmp_path, "migrate").returncode == 0
    done = _keypulse(tmp_path, "sql", "SELECT count() FROM usage_events")
    assert (done.returncode, done.stdout) == (0, "0\n"), done.stderr
    refused = _keypulse(tmp_path, "sql", "CREATE TABLE keypulse.x (a UInt8) ENGINE = Memory")
    assert refused.returncode == 1
    assert "READONLY" in refused.stderr or "readonly" in refused.stderr


def test_keypulse_sql_says_when_the_store_is_held(tmp_path: Path, store: Client) -> None:
    done = _keypulse(tmp_path, "sql", "SELECT 1", dsn=f"chdb://{tmp_path / 'clickhouse'}")
    assert done.returncode == 1
    assert "held by another process" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# -- docs/analytics.md -----------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
MORE_DATA = [
    "INSERT INTO keypulse.usage_stats (user_id, service, window_start, window_end, "
    "window_seconds, requests, server_errors, tokens_in, tokens_out, cost_usd) VALUES "
    "('u1', 'chat', now64(3), now64(3) + 10, 10, 2, 1, 5, 7, 0.25)",
    "INSERT INTO keypulse.alerts (alert_id, rule_id, rule_name, user_id, service, state, "
    "value, threshold, fired_at, emitted_at) VALUES "
    "('a1', 'r1', 'errors', 'u1', 'chat', 'firing', 0.5, 0.1, now64(3), now64(3))",
    "INSERT INTO keypulse.alert_rules (rule_id, user_id, name, metric, op, threshold, enabled, "
    "version) VALUES ('r1', 'u1', 'errors', 'error_rate', '>', 0.1, true, 1)",
    "INSERT INTO keypulse.notifications (notification_id, user_id, created_at) VALUES "
    "('n1', 'u1', now64(3)), ('n2', 'u1', now64(3))",
    "INSERT INTO keypulse.notification_reads (notification_id, user_id, read, at) VALUES "
    "('n1', 'u1', true, now64(3))",
]


def test_every_query_in_the_analytics_doc_runs(http: TestClient, store: Client,
                                               analyst: Callable[..., str]) -> None:
    for statement in MORE_DATA:
        store.command(statement)
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) >= 10
    answers = []
    for sql in blocks:
        response = http.post("/clickhouse/", content=sql.encode(), headers=_bearer(analyst()))
        assert response.status_code == 200, f"{sql}\n{response.text}"
        answers.append(response.text)
    assert all(answers[:10]), "each of the ten queries finds the test's rows"
    assert answers[9] == "u1\t1\n"  # n1 read, n2 unread

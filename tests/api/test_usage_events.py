"""`GET /v1/usage/events` and `GET /v1/usage/export` on the real engine: who may read, every
bad parameter, keyset pages stable under inserts, and exports streamed in chunks whose
CSV and parquet contents are exactly the stored rows."""

from __future__ import annotations

import csv
import io
import math
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import usage_events
from api.deps import get_clickhouse
from api.params import DAY_MS, encode_cursor, iso, parse_instant
from core import sketch
from core.clock import ManualClock
from core.errors import ServiceError
from core.outputs import EVENT_ROWS_OUTPUT, insert
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from pipeline.rows import encode_rows
from schemas.events import UsageEvent

HOUR_MS = 3_600_000
EVENTS = "/v1/usage/events"
EXPORT = "/v1/usage/export"


@pytest.fixture
def clock() -> ManualClock:
    """Wall time (to the minute): the store's TTL drops rows older than the retention by the
    real clock, so the rows of these tests are recent."""
    return ManualClock(float(int(time.time()) // 60 * 60))


@pytest.fixture
def now_ms(clock: ManualClock) -> int:
    return int(clock() * 1000)


@pytest.fixture(scope="module")
def clickhouse_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One migrated engine for the module (starting one per test cost more than the tests);
    `store` empties the tables these tests fill."""
    from tests.integration.harness import embedded

    path = tmp_path_factory.mktemp("usage-events")
    with embedded(path / "clickhouse") as client:
        migrate(client, load(dev=True, data_dir=path))
        yield client


@pytest.fixture
def store(app: FastAPI, api_settings: Settings, clickhouse_engine: Client) -> Client:
    for table in ("usage_events", "usage_rollup_1h", "usage_rollup_1d"):
        clickhouse_engine.command(f"TRUNCATE TABLE {api_settings.clickhouse_database}.{table}")
    app.dependency_overrides[get_clickhouse] = lambda: clickhouse_engine
    return clickhouse_engine


@pytest.fixture
def auth(token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def headers(user: str = "user-1", roles: tuple[str, ...] = ()) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(user, roles=roles)}"}

    return headers


def event(n: int, ts_ms: int, user: str = "user-1", **fields: Any) -> UsageEvent:
    base: dict[str, Any] = {"event_id": f"e{n:05d}", "ts": ts_ms, "user_id": user,
                            "api_key_id": f"key-{n % 3}", "service": "openai",
                            "status_code": 200, "latency_ms": 10 + n / 8}
    return UsageEvent(**{**base, **fields})


def store_events(store: Client, events: list[UsageEvent], *, late: bool = False,
                 ingested_ms: int = 1) -> None:
    """Into `usage_events_rows`, as the pipeline's sink writes them."""
    rows = [(*msgspec.structs.astuple(e), e.ts_ms, late, 0, i, ingested_ms)
            for i, e in enumerate(events)]
    insert(store, EVENT_ROWS_OUTPUT, "keypulse", encode_rows(rows))


def item(e: UsageEvent, late: bool = False) -> dict[str, Any]:
    """What the list answers for a stored event."""
    fields = msgspec.structs.asdict(e)
    return {**fields, "ts": iso(e.ts_ms), "method": e.method and e.method.upper(),
            "late": late}


# ---- who may read -------------------------------------------------------------------------


class _Untouchable:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("the store was used before the request was found valid")


@pytest.mark.parametrize("path", [EVENTS, EXPORT])
@pytest.mark.parametrize(("roles", "status"), [
    (None, 401), ("bad-token", 401), (("ingest",), 403), (("service",), 403),
    (("analyst",), 403), (("ingest", "analyst", "service"), 403),
])
def test_only_users_and_admins_read(app: FastAPI, auth: Callable[..., dict[str, str]],
                                    path: str, roles: Any, status: int) -> None:
    app.dependency_overrides[get_clickhouse] = _Untouchable
    if roles is None:
        headers = {}
    elif roles == "bad-token":
        headers = {"Authorization": "Bearer not.a.token"}
    else:
        headers = auth(roles=roles)
    with TestClient(app) as client:
        response = client.get(path, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == ("unauthorized" if status == 401 else "forbidden")


def _unreachable() -> None:
    raise ServiceError("cannot reach ClickHouse at http://127.0.0.1:1")


@pytest.mark.parametrize("path", [EVENTS, EXPORT])
def test_an_unreachable_store_is_a_503_before_any_byte(
    app: FastAPI, auth: Callable[..., dict[str, str]], path: str
) -> None:
    app.dependency_overrides[get_clickhouse] = _unreachable
    with TestClient(app) as client:
        response = client.get(path, headers=auth())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "unavailable"


@pytest.mark.parametrize(("path", "query", "field"), [
    (EVENTS, {"from": "yesterday"}, "from"),
    (EVENTS, {"to": "2026-12-01T12:00:00"}, "to"),  # no offset
    (EVENTS, {"from": "1764590400000", "to": "1764590400000"}, "to"),  # empty range
    (EVENTS, {"from": "1700000000000", "to": "1764590400000"}, "from"),  # beyond retention
    (EVENTS, {"service": "Not A Service"}, "service"),
    (EVENTS, {"status_class": "6xx"}, "status_class"),
    (EVENTS, {"limit": "0"}, "limit"),
    (EVENTS, {"limit": "1001"}, "limit"),
    (EVENTS, {"limit": "ten"}, "limit"),
    (EVENTS, {"cursor": "not a cursor!"}, "cursor"),
    (EVENTS, {"cursor": encode_cursor([1764590400000, "e1"])}, "cursor"),  # untagged
    (EVENTS, {"cursor": encode_cursor(["alerts", 1764590400000, "e1"])}, "cursor"),  # foreign
    (EVENTS, {"cursor": encode_cursor(["usage_events", "late", "e1"])}, "cursor"),  # tampered
    (EVENTS, {"cursor": "x" * 600}, "cursor"),
    (EXPORT, {"format": "xlsx"}, "format"),
    (EXPORT, {"data": "minutely"}, "data"),
    (EXPORT, {"from": "soon"}, "from"),
    (EXPORT, {"from": "1764590400000", "to": "1764500000000"}, "to"),
    (EXPORT, {"from": "1700000000000", "to": "1764590400000"}, "from"),  # events: retention
    (EXPORT, {"data": "daily", "from": "1700000000000", "to": "1764590400000"}, "from"),
    (EXPORT, {"service": "UPPER"}, "service"),
])
def test_each_bad_parameter_is_a_400_naming_it(
    app: FastAPI, auth: Callable[..., dict[str, str]], path: str, query: dict[str, str],
    field: str,
) -> None:
    app.dependency_overrides[get_clickhouse] = _Untouchable
    with TestClient(app) as client:
        response = client.get(path, params=query, headers=auth())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field


def test_rollup_exports_allow_400_days(app: FastAPI, store: Client, now_ms: int,
                                       auth: Callable[..., dict[str, str]]) -> None:
    with TestClient(app) as client:
        ok = client.get(EXPORT, params={"data": "daily", "from": now_ms - 400 * DAY_MS,
                                        "to": now_ms}, headers=auth())
        too_long = client.get(EXPORT, params={"data": "hourly", "from": now_ms - 401 * DAY_MS,
                                              "to": now_ms}, headers=auth())
    assert ok.status_code == 200
    assert ok.text.splitlines()[0].startswith("bucket_start,service,requests")
    assert too_long.status_code == 400
    assert too_long.json()["error"]["field"] == "from"


# ---- the list -----------------------------------------------------------------------------


def test_events_newest_first_with_their_contract_fields(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]]
) -> None:
    full = event(1, now_ms - 5000, endpoint="/v1/chat", method="post", tokens_in=12,
                 tokens_out=340, cost_usd=0.0125, request_bytes=800, response_bytes=4096,
                 error_type="rate_limited", region="eu-west-1", sdk="py/1.2", status_code=429)
    bare = event(2, now_ms - 4000, service="stripe", latency_ms=0.0)
    late = event(3, now_ms - 60 * 60_000)
    other = event(4, now_ms - 3000, user="user-2")
    store_events(store, [full, bare, other])
    store_events(store, [late], late=True)
    with TestClient(app) as client:
        response = client.get(EVENTS, headers=auth())
        admin = client.get(EVENTS, headers=auth("user-2", roles=("admin",)))
    assert response.status_code == 200
    assert response.json() == {"items": [item(bare), item(full), item(late, late=True)],
                               "next_cursor": None}
    assert response.json()["items"][1]["endpoint"] == "/v1/chat"
    assert response.json()["items"][0]["endpoint"] is None
    assert admin.json()["items"] == [item(other)]  # an admin reads its own sub's rows


def test_filters_and_the_half_open_range(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]]
) -> None:
    start = now_ms - 10 * HOUR_MS
    events = [event(0, start), event(1, start + 1, status_code=503),
              event(2, start + 2, service="stripe", status_code=404),
              event(3, start + 3, status_code=201), event(4, start + 4)]
    store_events(store, events)

    def ids(**query: Any) -> list[str]:
        with TestClient(app) as client:
            response = client.get(EVENTS, params=query, headers=auth())
        assert response.status_code == 200
        return [row["event_id"] for row in response.json()["items"]]

    assert ids(**{"from": start, "to": start + 4}) == ["e00003", "e00002", "e00001", "e00000"]
    assert ids(**{"from": iso(start + 1), "to": iso(start + 3)}) == ["e00002", "e00001"]
    assert ids(**{"from": start}, service="stripe") == ["e00002"]
    assert ids(**{"from": start}, status_class="2xx") == ["e00004", "e00003", "e00000"]
    assert ids(**{"from": start}, status_class="5xx") == ["e00001"]
    assert ids(**{"from": start}, service="stripe", status_class="2xx") == []
    assert ids() == [f"e0000{n}" for n in (4, 3, 2, 1, 0)]  # default: the last 24 h
    assert ids(**{"to": start}) == []


def test_pages_are_stable_under_inserts(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]]
) -> None:
    """Page, insert newer events (and replay one already listed), page on: every event of
    the first snapshot exactly once, in order; the new ones only on a new first page."""
    start = now_ms - HOUR_MS
    first = [event(n, start + (n // 2) * 1000) for n in range(25)]  # pairs share a ts
    store_events(store, first)
    seen: list[dict[str, Any]] = []
    with TestClient(app) as client:
        page = client.get(EVENTS, params={"limit": 10}, headers=auth()).json()
        seen += page["items"]
        store_events(store, [event(n, start + 60_000 + n) for n in range(100, 110)])
        store_events(store, [first[20], first[3]], ingested_ms=2)  # replays
        cursors = [page["next_cursor"]]
        while cursors[-1] is not None:
            page = client.get(EVENTS, params={"limit": 10, "cursor": cursors[-1]},
                              headers=auth()).json()
            seen += page["items"]
            cursors.append(page["next_cursor"])
        fresh = client.get(EVENTS, params={"limit": 10}, headers=auth()).json()
    assert len(cursors) == 3  # pages of 10, 10, 5
    assert seen == [item(e) for e in sorted(first, key=lambda e: (e.ts_ms, e.event_id),
                                            reverse=True)]
    assert [row["event_id"] for row in fresh["items"]] == [f"e{n:05d}" for n in
                                                           range(109, 99, -1)]


def test_a_replayed_event_is_listed_once(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]]
) -> None:
    once = event(1, now_ms - 1000)
    for ingested in (1, 2, 3):
        store_events(store, [once], ingested_ms=ingested)
    with TestClient(app) as client:
        listed = client.get(EVENTS, headers=auth()).json()["items"]
        exported = client.get(EXPORT, headers=auth()).text.splitlines()
    assert listed == [item(once)]
    assert len(exported) == 2  # header and the one event


def test_a_user_never_reads_another_users_rows(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]]
) -> None:
    users = ["user-1", "user-2", "user-10", "user-1 "]  # look-alikes too
    events = [event(n, now_ms - 1000 * n, user=users[n % len(users)]) for n in range(1, 41)]
    store_events(store, events)
    day = now_ms - (now_ms % DAY_MS)
    rollups = [(user, "openai", day, 1, []) for user in users]
    store_rollups(store, "usage_rollup_1d", rollups)
    with TestClient(app) as client:
        for user in users:
            own = {e.event_id for e in events if e.user_id == user}
            for roles in ((), ("user",), ("admin",)):
                query = {"user_id": "user-2", "limit": 1000}  # a parameter never picks the user
                listed = client.get(EVENTS, params=query, headers=auth(user, roles)).json()
                assert {row["event_id"] for row in listed["items"]} == own
                assert {row["user_id"] for row in listed["items"]} == {user}
            exported = client.get(EXPORT, params={"user_id": "user-2"}, headers=auth(user))
            rows = list(csv.DictReader(io.StringIO(exported.text)))
            assert {row["event_id"] for row in rows} == own
            daily = client.get(EXPORT, params={"data": "daily", "from": day}, headers=auth(user))
            assert len(list(csv.DictReader(io.StringIO(daily.text)))) == 1


# ---- exports ------------------------------------------------------------------------------


Rollup = tuple[str, str, int, int, list[float]]  # user, service, bucket_ms, errors, latencies


def store_rollups(store: Client, table: str,
                  rows: list[Rollup],
                  computed_ms: int = 1) -> None:
    """Rollup rows: at least one request per latency, `errors` of them 5xx and as many 4xx,
    and the latencies' sketch."""
    values = []
    for user, service, bucket_ms, errors, latencies in rows:
        keys, counts = sketch.bins_of_sorted(sorted(latencies))
        requests = max(len(latencies), 2 * errors + 1)
        values.append({
            "user_id": user, "service": service, "bucket_start": bucket_ms // 1000,
            "windows": 3, "requests": requests, "successes": requests - 2 * errors,
            "client_errors": errors, "server_errors": errors,
            "latency_sum_ms": sum(latencies), "latency_max_ms": max(latencies, default=0.0),
            "latency_bins": keys, "latency_bin_counts": counts, "tokens_in": 7 * requests,
            "tokens_out": 3, "cost_usd": requests / 8, "computed_at": computed_ms / 1000,
        })
    data = b"".join(msgspec.json.encode(value) + b"\n" for value in values)
    store.raw_insert(f"keypulse.{table}", list(values[0]), data, fmt="JSONEachRow")


def expected_rollup(row: Rollup) -> dict[str, Any]:
    _user, service, bucket_ms, errors, latencies = row
    keys, counts = sketch.bins_of_sorted(sorted(latencies))
    requests = max(len(latencies), 2 * errors + 1)
    top = max(latencies, default=0.0)
    return {
        "bucket_start": bucket_ms, "service": service, "requests": requests,
        "successes": requests - 2 * errors, "client_errors": errors, "server_errors": errors,
        "success_rate": (requests - 2 * errors) / requests,
        "error_rate": 2 * errors / requests, "server_error_rate": errors / requests,
        "latency_avg_ms": sum(latencies) / requests,
        **{f"latency_p{p}_ms": sketch.quantile(keys, counts, p / 100, top) for p in (50, 95, 99)},
        "latency_max_ms": top, "tokens_in": 7 * requests, "tokens_out": 3,
        "cost_usd": requests / 8,
    }


def csv_rows(text: str, columns: tuple[usage_events.Column, ...]) -> list[dict[str, Any]]:
    """CSV back to typed values, per the export's columns."""
    reader = csv.reader(io.StringIO(text))
    assert next(reader) == [column.name for column in columns]
    parsed = []
    for cells in reader:
        row: dict[str, Any] = {}
        for column, cell in zip(columns, cells, strict=True):
            kind = str(column.arrow)
            if cell == "":
                row[column.name] = None if column.name != "service" else ""
            elif kind.startswith("timestamp"):
                assert cell == iso(parse_instant(cell, "ts"))
                row[column.name] = parse_instant(cell, "ts")
            elif kind == "bool":
                assert cell in {"true", "false"}
                row[column.name] = cell == "true"
            elif kind.startswith("int"):
                row[column.name] = int(cell)
            elif kind == "double":
                row[column.name] = float(cell)
            else:
                row[column.name] = cell
        parsed.append(row)
    return parsed


def parquet_rows(body: bytes) -> tuple[list[dict[str, Any]], int]:
    """Parquet back to rows (times as epoch ms) and the number of row groups."""
    found = pq.ParquetFile(io.BytesIO(body))
    rows = found.read().to_pylist()
    for row in rows:
        for name, value in row.items():
            if hasattr(value, "timestamp"):
                row[name] = round(value.timestamp() * 1000)
    return rows, found.metadata.num_row_groups


def exported_event(e: UsageEvent, late: bool = False) -> dict[str, Any]:
    return {**item(e, late), "ts": e.ts_ms}


def download(client: TestClient, query: dict[str, Any], headers: dict[str, str]
             ) -> tuple[bytes, list[bytes], dict[str, str]]:
    """The body, its chunks as they arrived, and the headers."""
    with client.stream("GET", EXPORT, params=query, headers=headers) as response:
        assert response.status_code == 200, response.read()
        chunks = list(response.iter_raw())
        return b"".join(chunks), chunks, dict(response.headers)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_event_exports_stream_exactly_the_stored_events(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch, fmt: str,
) -> None:
    monkeypatch.setattr(usage_events, "CHUNK_ROWS", 7)
    start = now_ms - 2 * HOUR_MS
    events = [event(n, start + (n // 3) * 10, tokens_in=n if n % 2 else None,
                    cost_usd=n / 1000, endpoint=f"/v1/x,\"{n}\"" if n % 5 == 0 else None,
                    method="get" if n % 4 == 0 else None, region="eu" if n % 3 else None)
              for n in range(30)]
    store_events(store, events[:29])
    store_events(store, events[29:], late=True)
    store_events(store, [event(99, start + 5, user="user-2")])
    store_events(store, [event(98, start - 1)])  # before `from`
    query = {"format": fmt, "from": iso(start), "to": iso(now_ms)}
    with TestClient(app) as client:
        body, chunks, headers = download(client, query, auth())
    expected = [exported_event(e, late=e is events[29]) for e in events]
    stamp = iso(start).replace("-", "").replace(":", "").replace(".000", "")
    assert headers["content-disposition"].startswith(
        f'attachment; filename="keypulse-events-{stamp}-')
    assert headers["content-disposition"].endswith(f'.{fmt}"')
    assert "content-length" not in headers  # streamed, not buffered
    assert len(chunks) >= math.ceil(30 / 7)
    if fmt == "csv":
        assert headers["content-type"] == "text/csv; charset=utf-8"
        assert csv_rows(body.decode(), usage_events.EVENT_COLUMNS) == expected
    else:
        assert headers["content-type"] == "application/vnd.apache.parquet"
        rows, groups = parquet_rows(body)
        assert rows == expected
        assert groups == math.ceil(30 / 7)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize(("data", "table", "step"), [("hourly", "usage_rollup_1h", HOUR_MS),
                                                     ("daily", "usage_rollup_1d", DAY_MS)])
def test_rollup_exports_per_bucket_and_service(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch, fmt: str, data: str, table: str, step: int,
) -> None:
    monkeypatch.setattr(usage_events, "CHUNK_ROWS", 4)
    first = now_ms - now_ms % step - 5 * step
    rows = [("user-1", service, first + i * step, i % 2, [1.5 * (i + 1) * k for k in range(40)])
            for i in range(5) for service in ("anthropic", "openai")]
    stale = [(user, service, bucket, 9, [9999.0]) for user, service, bucket, *_ in rows[:3]]
    store_rollups(store, table, stale, computed_ms=1)
    store_rollups(store, table, rows, computed_ms=2)  # recomputed: replaces the stale rows
    store_rollups(store, table, [("user-2", "openai", first, 0, [1.0]),
                                 ("user-1", "openai", first - step, 0, [1.0]),  # before
                                 ("user-1", "openai", first + 5 * step, 0, [])])  # at `to`
    query = {"format": fmt, "data": data, "from": first, "to": first + 5 * step}
    with TestClient(app) as client:
        body, chunks, headers = download(client, query, auth())
    expected = [expected_rollup(row) for row in rows]
    assert f'filename="keypulse-{data}-' in headers["content-disposition"]
    assert len(chunks) >= 3
    if fmt == "csv":
        assert csv_rows(body.decode(), usage_events.ROLLUP_COLUMNS) == expected
    else:
        found, groups = parquet_rows(body)
        assert found == expected
        assert groups == 3


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_empty_export_is_a_valid_empty_file(
    app: FastAPI, store: Client, auth: Callable[..., dict[str, str]], fmt: str
) -> None:
    with TestClient(app) as client:
        body, _chunks, _headers = download(client, {"format": fmt}, auth())
    if fmt == "csv":
        assert csv_rows(body.decode(), usage_events.EVENT_COLUMNS) == []
    else:
        rows, groups = parquet_rows(body)
        assert (rows, groups) == ([], 0)
        assert pq.ParquetFile(io.BytesIO(body)).schema_arrow == usage_events.arrow_schema(
            usage_events.EVENT_COLUMNS)


BIG = 200_000


def store_many(store: Client, user: str, start_ms: int) -> None:
    """BIG events straight from SQL, as many_events() describes them."""
    store.command(
        "INSERT INTO keypulse.usage_events_rows SELECT concat('e', leftPad(toString(number), 7, "
        f"'0')), '', '{user}', 'key', 'openai', 200 + number % 3 * 100, number / 7, "
        "'/v1/chat', 'post', if(number % 2 = 0, NULL, number), NULL, number / 1000, NULL, NULL, "
        f"'', 'eu', '', 1, {start_ms} + number * 10, number % 9 = 0, 0, number, 1 "
        f"FROM numbers({BIG}) SETTINGS max_partitions_per_insert_block = 0")


def many_events(user: str, start_ms: int) -> pa.Table:
    """The events store_many() writes, as the export's Arrow table."""
    n = np.arange(BIG, dtype=np.int64)
    even = n % 2 == 0
    nothing = pa.nulls(BIG)
    columns = {
        "event_id": pa.array([f"e{i:07d}" for i in range(BIG)]),
        "ts": pa.array(start_ms + n * 10).cast(usage_events.TIME),
        "user_id": pa.array([user] * BIG), "api_key_id": pa.array(["key"] * BIG),
        "service": pa.array(["openai"] * BIG), "status_code": pa.array(200 + n % 3 * 100),
        "latency_ms": pa.array(n / 7), "endpoint": pa.array(["/v1/chat"] * BIG),
        "method": pa.array(["POST"] * BIG), "tokens_in": pa.array(n, mask=even),
        "tokens_out": nothing, "cost_usd": pa.array(n / 1000), "request_bytes": nothing,
        "response_bytes": nothing, "error_type": nothing, "region": pa.array(["eu"] * BIG),
        "sdk": nothing, "schema_version": pa.array(np.ones(BIG, dtype=np.int32)),
        "late": pa.array(n % 9 == 0),
    }
    schema = usage_events.arrow_schema(usage_events.EVENT_COLUMNS)
    return pa.table([columns[name].cast(schema.field(name).type) for name in schema.names],
                    schema=schema)


def read_csv_export(path: Path) -> pa.Table:
    """A CSV export read back with the export's types (an unquoted empty cell is null)."""
    schema = usage_events.arrow_schema(usage_events.EVENT_COLUMNS)
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types=schema, strings_can_be_null=True, quoted_strings_can_be_null=False,
        timestamp_parsers=[pacsv.ISO8601], true_values=["true"], false_values=["false"],
    )).cast(schema)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_large_export_keeps_the_servers_memory_bounded(
    app: FastAPI, store: Client, now_ms: int, auth: Callable[..., dict[str, str]],
    tmp_path: Path, fmt: str,
) -> None:
    """200,000 events streamed to a file: the process's Python and Arrow allocations stay a
    small fraction of the result's, and the file holds exactly the events."""
    start = now_ms - 3 * HOUR_MS
    store_many(store, "user-1", start)
    out = tmp_path / f"export.{fmt}"
    query = {"format": fmt, "from": start, "to": now_ms}
    arrow_base = pa.total_allocated_bytes()
    arrow_peak = chunks = 0
    with TestClient(app) as client, out.open("wb") as file:
        tracemalloc.start()
        try:
            with client.stream("GET", EXPORT, params=query, headers=auth()) as response:
                assert response.status_code == 200
                for chunk in response.iter_raw():
                    file.write(chunk)
                    chunks += 1
                    arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
            _, python_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    expected = many_events("user-1", start)
    found = read_csv_export(out) if fmt == "csv" else pq.read_table(out)
    print(f"{fmt}: {out.stat().st_size:,} bytes in {chunks} chunks; result in memory "
          f"{expected.nbytes:,} bytes; peaks: Python {python_peak:,}, Arrow {arrow_peak:,}")
    assert chunks >= BIG // usage_events.CHUNK_ROWS
    assert python_peak < expected.nbytes / 5  # a chunk or two, never the result
    assert arrow_peak < expected.nbytes / 5
    assert found.equals(expected)
    if fmt == "parquet":
        assert pq.ParquetFile(out).metadata.num_row_groups == BIG // usage_events.CHUNK_ROWS

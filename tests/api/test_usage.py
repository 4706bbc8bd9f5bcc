"""`/v1/usage/summary`, `timeseries` and `breakdown` on the real engine.

The test writes its own events straight into the migrated store: the raw events, the 10 s
windows the pipeline would close from them (with their latency sketches), and the 1 m, 1 h and
1 d rollups recomputed from those windows, plus stale twins of some rows that FINAL must
hide. The answers are held against figures computed here from the events themselves.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from api import analytics, create_app
from api.deps import get_clickhouse
from api.params import Interval, iso
from core import sketch
from core.clock import ManualClock
from core.settings import load
from infra.clickhouse.migrate import migrate

W = 10_000  # the windows (api_settings: window_seconds = 10)
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
BASE = int(time.time() * 1000) // DAY * DAY - 2 * DAY  # midnight two days ago (inside the TTLs)
START, END = BASE - 5 * HOUR - 17_345, BASE + DAY + 7 * HOUR + 4_321  # where the events lie
ROUTES = ("/v1/usage/summary", "/v1/usage/timeseries", "/v1/usage/breakdown?by=service")
KEYS = {"alice": ("a-key-1", "a-key-2", "a-key-3"), "bob": ("b-key-1", "b-key-2")}
SERVICES = ("openai", "stripe")
ENDPOINTS = ("/v1/chat", "/v1/embed", "/v1/charge")


@dataclass(frozen=True)
class Event:
    event_id: str
    ts: int
    user: str
    service: str
    key: str
    endpoint: str
    status: int
    latency: float
    tokens_in: int
    tokens_out: int
    cost: float
    late: bool = False  # in usage_events only: no window counted it


def make_events(seed: int = 7) -> list[Event]:
    rng = random.Random(seed)
    events = []
    for i in range(4000):
        user = rng.choice(("alice", "alice", "bob"))
        late = i % 97 == 0
        events.append(Event(
            f"e{i}", rng.randrange(START, END), user, rng.choice(SERVICES),
            rng.choice(KEYS[user]), rng.choice(ENDPOINTS),
            rng.choice((200, 200, 201, 302, 400, 404, 429, 500, 503)),
            0.0 if i % 211 == 0 else round(rng.lognormvariate(4, 1.0), 3),
            rng.randrange(0, 500), rng.randrange(0, 900), round(rng.random() / 100, 6), late))
    # a dense minute for alice, so her percentiles rest on many values in few windows
    for i in range(1500):
        events.append(Event(f"d{i}", BASE + 3 * HOUR + rng.randrange(0, MINUTE), "alice",
                            "openai", "a-key-1", "/v1/chat", 200,
                            round(rng.lognormvariate(3, 1.5), 3), 1, 2, 0.001))
    return events


EVENTS = make_events()


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def window_rows(events: list[Event]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The windows the pipeline closes from the (on-time) events: figures and sketch."""
    groups: dict[tuple[str, str, int], list[Event]] = defaultdict(list)
    for e in events:
        if not e.late:
            groups[(e.user, e.service, e.ts - e.ts % W)].append(e)
    windows = {}
    for key, group in groups.items():
        latencies = sorted(e.latency for e in group)
        bins, counts = sketch.bins_of_sorted(latencies)
        windows[key] = {
            "windows": 1, "requests": len(group),
            "successes": sum(e.status < 400 for e in group),
            "client_errors": sum(400 <= e.status < 500 for e in group),
            "server_errors": sum(e.status >= 500 for e in group),
            "latency_sum_ms": sum(latencies), "latency_max_ms": latencies[-1],
            "latency_bins": bins, "latency_bin_counts": counts,
            "tokens_in": sum(e.tokens_in for e in group),
            "tokens_out": sum(e.tokens_out for e in group),
            "cost_usd": sum(e.cost for e in group),
        }
    return windows


def rollup_rows(windows: dict[tuple[str, str, int], dict[str, Any]], step: int
                ) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Buckets of `step` recomputed from the windows starting in them."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for (user, service, start), row in windows.items():
        groups[(user, service, start - start % step)].append(row)
    buckets = {}
    for key, rows in groups.items():
        bins, counts = sketch.merge((r["latency_bins"], r["latency_bin_counts"]) for r in rows)
        bucket = {name: sum(r[name] for r in rows) for name in (
            "windows", "requests", "successes", "client_errors", "server_errors",
            "latency_sum_ms", "tokens_in", "tokens_out", "cost_usd")}
        buckets[key] = {**bucket, "latency_max_ms": max(r["latency_max_ms"] for r in rows),
                        "latency_bins": bins, "latency_bin_counts": counts}
    return buckets


FIGURES = ("requests", "successes", "client_errors", "server_errors", "latency_sum_ms",
           "latency_max_ms", "latency_bins", "latency_bin_counts", "tokens_in", "tokens_out",
           "cost_usd")


def fill(store: Client) -> None:
    """Everything the pipeline (and the rollup writer) would have written for EVENTS, each
    table also holding a stale twin of some rows with an older version."""
    store.insert("usage_events", [
        [e.event_id, at(e.ts), e.user, e.key, e.service, e.status, e.latency, e.endpoint,
         "POST", e.tokens_in, e.tokens_out, e.cost, e.late, at(e.ts + 1000)]
        for e in EVENTS] + [  # stale twins: replaced by the rows above (newer ingested_at)
        [e.event_id, at(e.ts), e.user, e.key, e.service, 500, 1e6, e.endpoint, "POST",
         0, 0, 0.0, e.late, at(e.ts)] for e in EVENTS[:300]],
        database="keypulse",
        column_names=["event_id", "ts", "user_id", "api_key_id", "service", "status_code",
                      "latency_ms", "endpoint", "method", "tokens_in", "tokens_out", "cost_usd",
                      "late", "ingested_at"])
    windows = window_rows(EVENTS)
    stale = at(BASE - DAY)
    fresh = at(BASE + 3 * DAY)
    rows = []
    for (user, service, start), row in windows.items():
        values = [row[name] for name in FIGURES]
        rows.append([user, service, at(start), at(start + W), 10, *values, fresh])
        if len(rows) % 7 == 0:  # a replayed window's older twin with other figures
            rows.append([user, service, at(start), at(start + W), 10, 99, 99, 0, 0, 1.0, 1.0,
                         [0], [99], 0, 0, 0.0, stale])
    store.insert("usage_stats", rows, database="keypulse", column_names=[
        "user_id", "service", "window_start", "window_end", "window_seconds", *FIGURES,
        "emitted_at"])
    for table, step in (("usage_rollup_1m", MINUTE), ("usage_rollup_1h", HOUR),
                        ("usage_rollup_1d", DAY)):
        rows = []
        for (user, service, start), row in rollup_rows(windows, step).items():
            rows.append([user, service, at(start), row["windows"],
                         *(row[name] for name in FIGURES), fresh])
            rows.append([user, service, at(start), 1, 1, 1, 0, 0, 1.0, 1.0, [1], [1], 0, 0,
                         0.0, stale])
        store.insert(table, rows, database="keypulse", column_names=[
            "user_id", "service", "bucket_start", "windows", *FIGURES, "computed_at"])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One filled store for the module's tests, which only read it (filling takes seconds)."""
    from tests.integration.harness import embedded  # the engine's client: lazily

    path = tmp_path_factory.mktemp("usage")
    with embedded(path / "clickhouse") as client:
        migrate(client, load(dev=True, data_dir=path))
        fill(client)
        yield client


@pytest.fixture
def http(app: FastAPI, store: Client, clock: ManualClock) -> Iterator[TestClient]:
    clock.advance(time.time() - clock())  # the app's now is now: the data lies 2 days back
    app.dependency_overrides[get_clickhouse] = lambda: store
    with TestClient(app) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def exact(events: list[Event]) -> dict[str, Any]:
    """The figures over `events`, computed from the events."""
    n = len(events)
    latencies = [e.latency for e in events]
    errors = sum(e.status >= 400 for e in events)
    return {
        "requests": n,
        "successes": n - errors,
        "client_errors": sum(400 <= e.status < 500 for e in events),
        "server_errors": sum(e.status >= 500 for e in events),
        "success_rate": (n - errors) / n if n else 0.0,
        "error_rate": errors / n if n else 0.0,
        "latency_avg_ms": sum(latencies) / n if n else None,
        "latency_max_ms": max(latencies) if n else None,
        "tokens_in": sum(e.tokens_in for e in events),
        "tokens_out": sum(e.tokens_out for e in events),
        "cost_usd": sum(e.cost for e in events),
    }


def counted(user: str, from_ms: int, to_ms: int, service: str | None = None) -> list[Event]:
    """The on-time events of the windows that start in [from_ms, to_ms)."""
    return [e for e in EVENTS if e.user == user and not e.late
            and from_ms <= e.ts - e.ts % W < to_ms and service in (None, e.service)]


def assert_figures(answer: dict[str, Any], events: list[Event]) -> None:
    want = exact(events)
    assert answer == {**answer, **want} | {
        k: pytest.approx(want[k], rel=1e-9) for k in ("latency_avg_ms", "cost_usd")
        if want[k] is not None}
    latencies = [e.latency for e in events]
    for q, name in ((0.5, "latency_p50_ms"), (0.95, "latency_p95_ms"), (0.99, "latency_p99_ms")):
        truth = nearest_rank(latencies, q)
        assert abs(answer[name] - truth) <= 0.01 * truth, (name, answer[name], truth)


# -- who may ask ----------------------------------------------------------------------------

def _no_clickhouse() -> None:
    raise AssertionError("ClickHouse opened before the request was checked")


def _no_store() -> None:
    """No client: a query that runs anyway fails the test with a 500."""


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("roles", "status"), [
    (None, 401), (("ingest",), 403), (("service",), 403), (("analyst",), 403),
    (("ingest", "analyst", "service"), 403)])
def test_only_users_and_admins_read_usage(app: FastAPI, token: Callable[..., str], route: str,
                                          roles: tuple[str, ...] | None, status: int) -> None:
    app.dependency_overrides[get_clickhouse] = _no_clickhouse
    headers = {} if roles is None else bearer(token(roles=roles))
    with TestClient(app) as client:
        response = client.get(route, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == ("unauthorized" if status == 401 else "forbidden")
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("query", "field", "status"), [
    ("from=yesterday", "from", 400),
    ("to=2026-12-01T12:00:00", "to", 400),  # no offset
    ("from=2026-12-01T12:00:00Z&to=2026-12-01T12:00:00Z", "to", 400),
    ("from=1764590400000&to=1764590399999", "to", 400),
    ("from=0&to=1764590400000", "from", 400),  # over 400 days
    ("service=" + "x" * 129, "service", 422),
    ("service=openai&service=stripe", "service", 400),  # never a silent pick of one
])
@pytest.mark.parametrize("route", ROUTES)
def test_bad_parameters_are_refused_before_the_store_is_touched(
    app: FastAPI, token: Callable[..., str], route: str, query: str, field: str, status: int
) -> None:
    app.dependency_overrides[get_clickhouse] = _no_store
    with TestClient(app) as client:
        response = client.get(f"{route}{'&' if '?' in route else '?'}{query}",
                              headers=bearer(token()))
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(("path", "field", "status", "says"), [
    ("/v1/usage/timeseries?interval=5m", "interval", 400, "10s, 1m, 1h, 1d"),
    ("/v1/usage/timeseries?interval=10s&from=0&to=15000001", "interval", 400, "1,501 points"),
    ("/v1/usage/timeseries?interval=1m&from=0&to=90000001", "interval", 400, "1,501 points"),
    ("/v1/usage/breakdown?by=region", "by", 400, "service, api_key, endpoint, status_class"),
    ("/v1/usage/breakdown", "by", 422, "required"),
    ("/v1/usage/breakdown?by=service&limit=0", "limit", 422, "greater than"),
    ("/v1/usage/breakdown?by=service&limit=1001", "limit", 422, "less than"),
])
def test_intervals_groups_and_limits_are_checked(
    app: FastAPI, token: Callable[..., str], path: str, field: str, status: int, says: str
) -> None:
    app.dependency_overrides[get_clickhouse] = _no_store
    with TestClient(app) as client:
        response = client.get(path, headers=bearer(token()))
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert says in response.json()["error"]["message"]


def test_an_unreachable_store_is_503(tmp_path: Path, token: Callable[..., str],
                                     clock: ManualClock) -> None:
    down = load(dev=True, data_dir=tmp_path, clickhouse_dsn="http://127.0.0.1:1")
    with TestClient(create_app(down, clock=clock)) as client:
        for route in ROUTES:
            response = client.get(route, headers=bearer(token()))
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            assert response.json()["error"]["code"] == "unavailable"


def test_openapi_documents_every_answer(app: FastAPI) -> None:
    with TestClient(app) as client:
        paths = client.get("/openapi.json").json()["paths"]
    for route, shape in (("summary", "windows"), ("timeseries", "points"),
                         ("breakdown", "rows")):
        operation = paths[f"/v1/usage/{route}"]["get"]
        assert set(operation["responses"]) >= {"200", "400", "401", "403", "422", "503"}
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert shape in ok["properties"]
        names = {p["name"] for p in operation["parameters"]}
        assert {"from", "to", "service"} <= names
        assert "user_id" not in names and "user" not in names
    summary = paths["/v1/usage/summary"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    assert "null when there are no requests" in str(summary["properties"]["latency_p99_ms"])


# -- what they answer -----------------------------------------------------------------------

@pytest.mark.integration  # the real engine (`store`)
@pytest.mark.parametrize("roles", [(), ("user",), ("admin",), ("user", "ingest")])
def test_summary_is_exact_over_the_users_own_windows(
    http: TestClient, token: Callable[..., str], roles: tuple[str, ...]
) -> None:
    response = http.get("/v1/usage/summary", params={"from": START - 1, "to": END + 1},
                        headers=bearer(token("alice", roles=roles)))
    assert response.status_code == 200, response.text
    body = response.json()
    own = counted("alice", START - 1, END + 1)
    assert_figures(body, own)
    assert body["windows"] == len({(e.service, e.ts - e.ts % W) for e in own})
    assert body["from"] == iso(-(-(START - 1) // W) * W)  # snapped up to the window grid
    assert body["to"] == iso(-(-(END + 1) // W) * W)


@pytest.mark.integration  # the real engine (`store`)
def test_summary_of_one_service_and_of_an_unaligned_range(http: TestClient,
                                                          token: Callable[..., str]) -> None:
    lo, hi = BASE - 2 * HOUR + 12_345, BASE + DAY + 3 * HOUR + 5_678
    response = http.get("/v1/usage/summary", headers=bearer(token("bob")), params={
        "from": iso(lo), "to": str(hi), "service": "stripe"})
    assert response.status_code == 200
    assert_figures(response.json(), counted("bob", lo, hi, "stripe"))


@pytest.mark.integration  # the real engine (`store`)
def test_an_empty_range_answers_zeros_and_null_latencies(http: TestClient,
                                                         token: Callable[..., str]) -> None:
    cases: list[tuple[str, dict[str, int | str]]] = [
        ("carol", {"from": START, "to": END}),
        ("alice", {"from": END + HOUR, "to": END + 2 * HOUR}),
        ("alice", {"from": START, "to": END, "service": "nowhere"}),
        ("alice", {"from": BASE + 1, "to": BASE + 2}),  # no window starts there
    ]
    for user, params in cases:
        body = http.get("/v1/usage/summary", params=params, headers=bearer(token(user))).json()
        assert body["requests"] == body["windows"] == body["tokens_in"] == 0
        assert body["success_rate"] == body["error_rate"] == body["cost_usd"] == 0
        assert body["latency_p50_ms"] is body["latency_avg_ms"] is body["latency_max_ms"] is None
        for route, extra in (("timeseries", {"interval": "1h"}), ("breakdown", {"by": "service"}),
                             ("breakdown", {"by": "endpoint"})):
            answer = http.get(f"/v1/usage/{route}", params={**params, **extra},
                              headers=bearer(token(user)))
            assert answer.status_code == 200
            assert answer.json().get("points", answer.json().get("rows")) == []


@pytest.mark.integration  # the real engine (`store`)
@pytest.mark.parametrize(("interval", "lo", "hi"), [
    ("10s", BASE + 3 * HOUR - 5 * MINUTE - 3_000, BASE + 3 * HOUR + 7 * MINUTE + 1),
    ("1m", BASE + 2 * HOUR + 17_000, BASE + 3 * HOUR + 41 * MINUTE),
    ("1h", START, END),
    ("1d", BASE - 2 * DAY, BASE + 2 * DAY),
])
def test_timeseries_counts_each_bucket_exactly(http: TestClient, token: Callable[..., str],
                                              interval: str, lo: int, hi: int) -> None:
    step = {"10s": 10_000, "1m": MINUTE, "1h": HOUR, "1d": DAY}[interval]
    response = http.get("/v1/usage/timeseries", headers=bearer(token("alice")),
                        params={"from": lo, "to": hi, "interval": interval})
    assert response.status_code == 200, response.text
    body = response.json()
    first, last = -(-lo // step) * step, -(-hi // step) * step
    assert (body["from"], body["to"], body["interval"]) == (
        iso(first), iso(last), interval)
    buckets: dict[int, list[Event]] = defaultdict(list)
    for e in counted("alice", first, last):
        buckets[e.ts - e.ts % step].append(e)
    assert [p["time"] for p in body["points"]] == [iso(t) for t in sorted(buckets)]
    for point in body["points"]:
        start = int(datetime.fromisoformat(point["time"]).timestamp() * 1000)
        assert_figures(point, buckets[start])


@pytest.mark.integration  # the real engine (`store`)
def test_breakdown_by_service_reads_the_windows(http: TestClient,
                                                token: Callable[..., str]) -> None:
    body = http.get("/v1/usage/breakdown", headers=bearer(token("alice")),
                    params={"by": "service", "from": START, "to": END}).json()
    assert body["by"] == "service"
    groups = defaultdict(list)
    for e in counted("alice", START, END):
        groups[e.service].append(e)
    assert [row["group"] for row in body["rows"]] == sorted(
        groups, key=lambda g: (-len(groups[g]), g))
    for row in body["rows"]:
        assert_figures(row, groups[row["group"]])


@pytest.mark.integration  # the real engine (`store`)
@pytest.mark.parametrize(("by", "group_of"), [
    ("api_key", lambda e: e.key),
    ("endpoint", lambda e: e.endpoint),
    ("status_class", lambda e: f"{e.status // 100}xx"),
])
def test_breakdowns_of_raw_events_count_late_ones_too(
    http: TestClient, token: Callable[..., str], by: str, group_of: Callable[[Event], str]
) -> None:
    lo, hi = BASE - HOUR + 4_567, END
    body = http.get("/v1/usage/breakdown", headers=bearer(token("alice")),
                    params={"by": by, "from": lo, "to": hi}).json()
    first, last = -(-lo // W) * W, -(-hi // W) * W
    groups = defaultdict(list)
    for e in EVENTS:
        if e.user == "alice" and first <= e.ts < last:  # late or not
            groups[group_of(e)].append(e)
    assert any(e.late for events in groups.values() for e in events)
    assert [row["group"] for row in body["rows"]] == sorted(
        groups, key=lambda g: (-len(groups[g]), g))
    for row in body["rows"]:
        assert_figures(row, groups[row["group"]])
    limited = http.get("/v1/usage/breakdown", headers=bearer(token("alice")),
                       params={"by": by, "from": lo, "to": hi, "limit": 2}).json()
    assert [(r["group"], r["requests"], r["latency_p99_ms"]) for r in limited["rows"]] == [
        (r["group"], r["requests"], r["latency_p99_ms"]) for r in body["rows"][:2]]


@pytest.mark.integration  # the real engine (`store`)
def test_percentiles_merge_sketches_never_average_window_percentiles(
    http: TestClient, token: Callable[..., str]
) -> None:
    """The dense minute: six windows of ~250 values each; the average of their p99s is far
    from the p99 of them all, and the answer is within 1 % of the latter."""
    lo, hi = BASE + 3 * HOUR, BASE + 3 * HOUR + MINUTE
    own = counted("alice", lo, hi)
    assert len(own) > 1000
    body = http.get("/v1/usage/summary", params={"from": lo, "to": hi},
                    headers=bearer(token("alice"))).json()
    assert_figures(body, own)
    windows: dict[int, list[float]] = defaultdict(list)
    for e in own:
        windows[e.ts - e.ts % W].append(e.latency)
    averaged = sum(nearest_rank(v, 0.99) for v in windows.values()) / len(windows)
    truth = nearest_rank([e.latency for e in own], 0.99)
    assert abs(averaged - truth) > 0.05 * truth  # the trap is real in this data
    assert abs(body["latency_p99_ms"] - truth) <= 0.005 * truth  # ±ALPHA


@pytest.mark.integration  # the real engine (`store`)
def test_a_user_never_sees_another_users_rows(http: TestClient,
                                              token: Callable[..., str]) -> None:
    params = {"from": START, "to": END}
    for user in ("alice", "bob"):
        keys = http.get("/v1/usage/breakdown", params={**params, "by": "api_key"},
                        headers=bearer(token(user))).json()["rows"]
        assert {row["group"] for row in keys} == set(KEYS[user])
        summary = http.get("/v1/usage/summary", params=params,
                           headers=bearer(token(user))).json()
        assert summary["requests"] == len(counted(user, START, END))
        series = http.get("/v1/usage/timeseries", params={**params, "interval": "1h"},
                          headers=bearer(token(user))).json()
        assert sum(p["requests"] for p in series["points"]) == summary["requests"]
        # `user_id` is not a parameter: an attempt to pass one is ignored
        other = http.get("/v1/usage/summary", params={**params, "user_id": "alice"},
                         headers=bearer(token(user))).json()
        floats = ("latency_avg_ms", "cost_usd")  # sums of floats: the order of addition varies
        assert {k: v for k, v in other.items() if k not in floats} == {
            k: v for k, v in summary.items() if k not in floats}


# -- the decomposition ----------------------------------------------------------------------

def test_plan_cuts_a_range_into_disjoint_parts_that_cover_it() -> None:
    span = analytics.Span(BASE - HOUR - MINUTE - W, BASE + DAY + HOUR + MINUTE + W)
    every = ("usage_rollup_1m", "usage_rollup_1h", "usage_rollup_1d")
    assert analytics.plan(span, rollups=every) == {
        "usage_rollup_1d": [analytics.Span(BASE, BASE + DAY)],
        "usage_rollup_1h": [analytics.Span(BASE - HOUR, BASE),
                            analytics.Span(BASE + DAY, BASE + DAY + HOUR)],
        "usage_rollup_1m": [analytics.Span(BASE - HOUR - MINUTE, BASE - HOUR),
                            analytics.Span(BASE + DAY + HOUR, BASE + DAY + HOUR + MINUTE)],
        "usage_stats": [analytics.Span(span.from_ms, BASE - HOUR - MINUTE),
                        analytics.Span(BASE + DAY + HOUR + MINUTE, span.to_ms)],
    }
    # a summary's default: days, hours, and the windows for the rest
    assert analytics.plan(span) == {
        "usage_rollup_1d": [analytics.Span(BASE, BASE + DAY)],
        "usage_rollup_1h": [analytics.Span(BASE - HOUR, BASE),
                            analytics.Span(BASE + DAY, BASE + DAY + HOUR)],
        "usage_stats": [analytics.Span(span.from_ms, BASE - HOUR),
                        analytics.Span(BASE + DAY + HOUR, span.to_ms)],
    }
    assert analytics.plan(analytics.Span(BASE + W, BASE + 5 * W), rollups=every) == {
        "usage_stats": [analytics.Span(BASE + W, BASE + 5 * W)]}
    # what the rollups may not hold yet comes from finer tables: the day from hours, the
    # last hour from minutes, the last minutes from the windows
    fresh = BASE + DAY + 14 * MINUTE  # days lag up to 15 min, hours 3 min, minutes 10 s
    assert analytics.plan(analytics.Span(BASE, fresh), fresh, every) == {
        "usage_rollup_1h": [analytics.Span(BASE, BASE + DAY)],
        "usage_rollup_1m": [analytics.Span(BASE + DAY, BASE + DAY + 13 * MINUTE)],
        "usage_stats": [analytics.Span(BASE + DAY + 13 * MINUTE, fresh)],
    }
    assert analytics.plan(analytics.Span(BASE, fresh), fresh + MINUTE, every) == {
        "usage_rollup_1d": [analytics.Span(BASE, BASE + DAY)],
        "usage_rollup_1m": [analytics.Span(BASE + DAY, fresh)]}
    # a series reads its interval's rollup (a day's also hours'), never a coarser one
    assert {interval: set(analytics.plan(span, None, tables))
            for interval, tables in analytics.SERIES_ROLLUPS.items()} == {
        Interval.S10: {"usage_stats"},
        Interval.M1: {"usage_rollup_1m", "usage_stats"},
        Interval.H1: {"usage_rollup_1h", "usage_stats"},
        Interval.D1: {"usage_rollup_1d", "usage_rollup_1h", "usage_stats"}}


@pytest.mark.integration  # the real engine (`store`)
def test_windows_the_rollups_do_not_hold_yet_are_counted(
    http: TestClient, store: Client, clock: ManualClock, token: Callable[..., str]
) -> None:
    """The rollup writer recomputes hours a minute, days ten minutes after the windows are
    stored; until then the answers read the recent part from the windows themselves."""
    now = int(clock() * 1000)
    figures = [3, 3, 0, 0, 30.0, 20.0, [sketch.bin_of(5.0), sketch.bin_of(20.0)], [2, 1], 1, 2,
               0.5]
    just_stored = now - 20_000 - (now - 20_000) % W  # in no rollup yet
    minute_done = now - 95_000 - (now - 95_000) % W  # in its minute's rollup, not its hour's
    store.insert("usage_stats", [
        ["dave", "openai", at(start), at(start + W), 10, *figures]
        for start in (just_stored, minute_done)], database="keypulse", column_names=[
            "user_id", "service", "window_start", "window_end", "window_seconds", *FIGURES])
    store.insert("usage_rollup_1m", [["dave", "openai", at(minute_done - minute_done % MINUTE),
                                      1, *figures]], database="keypulse",
                 column_names=["user_id", "service", "bucket_start", "windows", *FIGURES])
    params = {"from": now - DAY, "to": now}
    summary = http.get("/v1/usage/summary", params=params, headers=bearer(token("dave"))).json()
    assert (summary["requests"], summary["windows"], summary["latency_max_ms"]) == (6, 2, 20.0)
    assert summary["latency_p50_ms"] == pytest.approx(5.0, rel=0.005)
    for interval in ("1m", "1h"):
        series = http.get("/v1/usage/timeseries", params={**params, "interval": interval},
                          headers=bearer(token("dave"))).json()
        assert sum(p["requests"] for p in series["points"]) == 6, interval
    by_service = http.get("/v1/usage/breakdown", params={**params, "by": "service"},
                          headers=bearer(token("dave"))).json()
    assert [(r["group"], r["requests"]) for r in by_service["rows"]] == [("openai", 6)]


PLAIN = (
    "SELECT count(), sum(requests), sum(successes), sum(client_errors), sum(server_errors), "
    "sum(latency_sum_ms), max(latency_max_ms), "
    "sumMap(latency_bins, CAST(latency_bin_counts, 'Array(UInt64)')), "
    "sum(tokens_in), sum(tokens_out), sum(cost_usd) FROM keypulse.usage_stats FINAL "
    "WHERE user_id = {user:String} AND window_start >= fromUnixTimestamp64Milli({lo:Int64}) "
    "AND window_start < fromUnixTimestamp64Milli({hi:Int64})")


@pytest.mark.integration  # the real engine (`store`)
@settings(max_examples=12, deadline=None)
@given(lo=st.integers(START - HOUR, END), length=st.integers(1, 2 * DAY),
       user=st.sampled_from(("alice", "bob")),
       fresh=st.one_of(st.none(), st.integers(START, END + DAY)),
       rollups=st.sampled_from((analytics.SUMMARY_ROLLUPS, analytics.EVERY_ROLLUP)))
def test_the_decomposition_equals_the_plain_window_aggregation(
    store: Client, lo: int, length: int, user: str, fresh: int | None, rollups: tuple[str, ...]
) -> None:
    span = analytics.snap(lo, lo + length, W)
    got = analytics.summary(store, "keypulse", user, span, fresh_ms=fresh, rollups=rollups)
    row = store.query(PLAIN, parameters={"user": user, "lo": span.from_ms,
                                         "hi": span.to_ms}).result_rows[0]
    (keys, counts), top = row[7], row[6]
    # the percentiles read in SQL (analytics.sql_quantile) are core.sketch.quantile's
    want = analytics.figures([*row[:7], *(sketch.quantile(keys, counts, q, top)
                                          for q in analytics.QUANTILES), *row[8:]])
    for name, value in want.items():  # sums of floats: the order of addition differs
        assert getattr(got, name) == (value if value is None else pytest.approx(value, rel=1e-9))
    assert got.windows == row[0]
    assert got.requests == len(counted(user, lo, lo + length))


@pytest.mark.integration  # the real engine (`store`)
@settings(max_examples=40, deadline=None)
@given(latencies=st.lists(st.one_of(st.just(0.0), st.floats(1e-7, 1e6)), max_size=300),
       q=st.sampled_from(analytics.QUANTILES))
def test_percentiles_read_in_sql_are_core_sketch_quantiles(
    store: Client, latencies: list[float], q: float
) -> None:
    keys, counts = sketch.bins_of_sorted(sorted(latencies))
    top = max(latencies, default=0.0)
    expression = analytics.sql_quantile(q)
    got = store.query(
        f"SELECT {expression} FROM (SELECT *, {analytics.SKETCH_COLUMNS} FROM (SELECT "
        "({keys:Array(Int16)}, {counts:Array(UInt64)}) AS sketch, {top:Float64} AS top))",
        parameters={"keys": keys, "counts": counts, "top": top}).result_rows[0][0]
    want = sketch.quantile(keys, counts, q, top)
    assert got == (want if want is None else pytest.approx(want, rel=1e-12))

"""Tenant isolation as a property: a user's token never returns another user's rows.

Hypothesis draws 2-5 users, each with rows of their own in usage_events, usage_stats and
the 1 m/1 h/1 d rollups (every row marked: the user's services, API keys, endpoints and
event ids carry a tag that only that user has), then requests to random GET routes of the
OpenAPI document under /v1/usage, /v1/alerts and /v1/notifications (whichever exist: the
routes are read from the document, so new ones are covered as they land) with random valid
parameters, another user's `service`, `user_id`-looking parameters and cursors another user
was given. Whatever the answer (success or refusal), it holds none of another user's
markers (except those the request itself carried); a summary's `requests` is the user's own
count over the range it reports.

One engine for the module (chDB admits one process per path); each example truncates the
tables and seeds with one insert per table.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlencode

import pyarrow.parquet as pq
import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from api import create_app
from api.deps import get_clickhouse
from core.auth import USER_ROLE, mint_token
from core.clock import ManualClock
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from tests.api.usage_rows import WINDOW_MS, Event, clear, seed
from tests.integration.harness import embedded

pytestmark = pytest.mark.integration  # the real engine, opened by this module's fixture

PREFIXES = ("/v1/usage", "/v1/alerts", "/v1/notifications")
NOW_S = float(int(time.time()) // 60 * 60)  # real time: the engine's TTLs keep the rows
NOW_MS = int(NOW_S * 1000)
SPAN_MS = 3 * 86_400_000  # rows in the last three days
# parameters a route must ignore or refuse: the user comes from the token only
IMPOSTOR_PARAMS = ("user_id", "user", "sub", "userId", "tenant")


@dataclass(frozen=True)
class Route:
    path: str
    parameters: list[dict[str, Any]]


@dataclass(frozen=True)
class Served:
    app: FastAPI
    http: TestClient
    client: Client
    settings: Settings
    routes: list[Route]


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """The parameter's schema with `$ref` and `anyOf [X, null]` unwrapped."""
    if "$ref" in schema:
        found: dict[str, Any] = components["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        return _resolve({**found, **{k: v for k, v in schema.items() if k != "$ref"}},
                        components)
    for option in schema.get("anyOf", ()):
        if option.get("type") != "null":
            return _resolve(option, components)
    return schema


def _routes(app: FastAPI) -> list[Route]:
    document = app.openapi()
    components = document.get("components", {})
    found = []
    for path, item in document["paths"].items():
        operation = item.get("get")
        if operation is None or not path.startswith(PREFIXES) or "{" in path:
            continue
        parameters = [{**parameter, "schema": _resolve(parameter.get("schema", {}), components)}
                      for parameter in operation.get("parameters", ())
                      if parameter["in"] == "query"]
        found.append(Route(path, parameters))
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("isolation") / "clickhouse"
    app_settings = load(dev=True, data_dir=path.parent, clickhouse_dsn=f"chdb://{path}",
                        kafka_bootstrap="127.0.0.1:1", topic_prefix=f"i{uuid.uuid4().hex[:8]}.")
    with embedded(path) as client:
        migrate(client, app_settings)
        app = create_app(app_settings, clock=ManualClock(NOW_S))
        app.dependency_overrides[get_clickhouse] = lambda: client
        with TestClient(app) as http:
            yield Served(app, http, client, app_settings, _routes(app))


# --- the world: users and their marked rows ----------------------------------------------


@dataclass(frozen=True)
class User:
    user_id: str
    tag: str  # in every marker of this user's rows, in no other user's
    events: list[Event]

    @property
    def markers(self) -> set[str]:
        found = {self.user_id}
        for row in self.events:
            found |= {row.event_id, row.api_key_id, row.service, row.endpoint}
        return found


@st.composite
def users(draw: st.DrawFn) -> list[User]:
    count = draw(st.integers(2, 5))
    made = []
    for index in range(count):
        tag = f"t{index}q{draw(st.integers(100, 999))}z"  # unique: the index is in it
        services = [f"svc-{tag}-{name}" for name in ("a", "b")[:draw(st.integers(1, 2))]]
        events = [
            Event(
                event_id=f"ev-{tag}-{number}",
                ts_ms=NOW_MS - draw(st.integers(1, SPAN_MS)),
                user_id=f"user-{tag}",
                api_key_id=f"key-{tag}-{draw(st.integers(0, 2))}",
                service=draw(st.sampled_from(services)),
                status_code=draw(st.sampled_from((200, 201, 302, 404, 429, 500, 503))),
                latency_ms=draw(st.floats(0.5, 5_000, allow_nan=False)),
                endpoint=f"/ep-{tag}/{draw(st.integers(0, 2))}",
                tokens_in=draw(st.integers(0, 1_000)),
                tokens_out=draw(st.integers(0, 1_000)),
                cost_usd=draw(st.floats(0, 1, allow_nan=False)),
            )
            for number in range(draw(st.integers(1, 25)))
        ]
        made.append(User(f"user-{tag}", tag, events))
    return made


# --- random requests from the document ---------------------------------------------------


def _instant(ms: int, rfc3339: bool) -> str:
    if not rfc3339:
        return str(ms)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


@st.composite
def query(draw: st.DrawFn, route: Route, world: list[User], cursors: list[str]
          ) -> dict[str, str]:
    """Random parameters for `route`: mostly valid, from any user's markers."""
    every = sorted(set().union(*(user.markers for user in world)))
    params: dict[str, str] = {}
    start = draw(st.integers(NOW_MS - SPAN_MS - 3_600_000, NOW_MS))
    width = draw(st.sampled_from((10_000, 60_000, 3_600_000, 86_400_000, SPAN_MS)))
    bounds = (start, start + draw(st.integers(1, width)))
    for parameter in route.parameters:
        name, schema = parameter["name"], parameter["schema"]
        if not parameter.get("required") and draw(st.integers(0, 3)) == 0:
            continue
        rfc3339 = draw(st.booleans())
        if name == "from":
            value = _instant(bounds[0], rfc3339)
        elif name == "to":
            value = _instant(bounds[1] + 1, rfc3339)
        elif name == "cursor":
            if not cursors:
                continue
            value = draw(st.sampled_from(cursors))
        elif "enum" in schema:
            value = str(draw(st.sampled_from(schema["enum"])))
        elif schema.get("type") == "integer":
            value = str(draw(st.integers(max(schema.get("minimum", 1), 1),
                                         min(schema.get("maximum", 100), 100))))
        elif schema.get("type") == "boolean":
            value = draw(st.sampled_from(("true", "false")))
        else:  # a service, an API key, an endpoint...: anyone's
            value = draw(st.sampled_from([*every, *schema.get("examples", ())]))
        params[name] = value
    for name in draw(st.lists(st.sampled_from(IMPOSTOR_PARAMS), max_size=2, unique=True)):
        params[name] = draw(st.sampled_from([user.user_id for user in world]))
    return params


def _text(response: Any) -> str:
    """The answer as text (a Parquet export: its rows)."""
    if response.headers.get("content-type", "").startswith("application/vnd.apache.parquet"):
        return str(pq.read_table(io.BytesIO(response.content)).to_pylist())
    return str(response.text)


def _own_requests(user: User, start_ms: int, end_ms: int, service: str | None) -> int:
    """How many of the user's events lie in windows starting in `[start, end)`."""
    return sum(1 for row in user.events
               if start_ms <= row.ts_ms // WINDOW_MS * WINDOW_MS < end_ms
               and service in (None, row.service))


def _ms(instant: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp() * 1000)


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(world=users(), data=st.data())
def test_a_token_never_returns_another_users_rows(served: Served, world: list[User],
                                                  data: st.DataObject) -> None:
    assert served.routes, "no GET route under /v1/usage, /v1/alerts or /v1/notifications"
    database = served.settings.clickhouse_database
    clear(served.client, database)
    seed(served.client, database, [row for user in world for row in user.events])
    clock = served.app.state.clock
    tokens = {user.user_id: mint_token(
        served.settings, user.user_id, roles=data.draw(st.sampled_from(((), (USER_ROLE,)))),
        ttl_seconds=3600, clock=clock) for user in world}
    cursors: list[str] = []  # next_cursor values any user was given
    for _ in range(data.draw(st.integers(1, 6))):
        user = data.draw(st.sampled_from(world))
        route = data.draw(st.sampled_from(served.routes))
        params = data.draw(query(route, world, cursors))
        response = served.http.get(route.path, params=params,
                                   headers={"Authorization": f"Bearer {tokens[user.user_id]}"})
        sent = unquote_plus(urlencode(params))
        request = f"GET {route.path}?{sent} as {user.user_id}"
        assert response.status_code < 500, f"{request}: {response.status_code} {response.text}"
        event(f"{route.path} {response.status_code}")
        answer = _text(response)
        for other in world:
            if other is user:
                continue
            leaked = {marker for marker in other.markers
                      if marker in answer and marker not in sent}
            assert not leaked, f"{request} answered {other.user_id}'s {sorted(leaked)[:5]}"
        if response.status_code != 200 or not response.headers.get(
                "content-type", "").startswith("application/json"):
            continue
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("next_cursor"), str):
            cursors.append(body["next_cursor"])
        if route.path == "/v1/usage/summary":
            expected = _own_requests(user, _ms(body["from"]), _ms(body["to"]),
                                     params.get("service"))
            assert body["requests"] == expected, f"{request}: {body}"

"""`POST /v1/api-keys/events`: who may post (service only), every refusal (secrets named by
field and never echoed, unknown fields, bad values), and, through the real broker and engine,
an accepted event published on both topics, stored once, audited, and idempotent by
`event_id` (a retry publishes nothing again; a reused id for another event is a 409)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api import create_app
from api.deps import get_clickhouse
from core import clickhouse
from core.auth import mint_token
from core.clock import ManualClock
from core.settings import Settings, load
from core.topics import APIKEY_EVENTS, NOTIFICATIONS
from infra.clickhouse.migrate import migrate
from schemas.api_keys import ApiKeyEvent, DeclaredBy
from schemas.notifications import Notification
from tests.api.live import read_topic

PATH = "/v1/api-keys/events"
EVENT = {"user_id": "alice", "action": "rotated", "api_key_id": "key_7f3a",
         "service": "openai", "name": "production"}
# what a careless backend might send: each must be refused and never shown again
SECRETS = {
    "openai": "sk-proj-Q2x9vLmR7tY4wZ8pA1sD6fG3hJ0kN5bV",
    "stripe": "sk_live_51HqLyjWDarjtT1zdp7dcAbCdEfGh",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "github": "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
    "entropy": "Zq8Xw2Lm9Rt4Yv7Pn3Bk6Hj1Gf5Dc0Sa",
}


class _Untouchable:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("the store was used before the request was found valid")


@pytest.fixture
def clock() -> ManualClock:
    """Wall time: the tables' TTLs judge rows by the real clock."""
    return ManualClock(float(int(time.time())))


@pytest.fixture(scope="module")
def offline_app(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[TestClient, Settings, ManualClock]]:
    """One app for the refusals (no broker: nothing may reach it), with a store that fails
    the test if a refused request reaches it."""
    settings = load(dev=True, data_dir=tmp_path_factory.mktemp("api-keys-offline"),
                    topic_prefix=f"a{uuid.uuid4().hex[:8]}.", kafka_bootstrap="127.0.0.1:1")
    clock = ManualClock(float(int(time.time())))
    app = create_app(settings, clock=clock)
    app.dependency_overrides[get_clickhouse] = _Untouchable
    with TestClient(app) as client:
        yield client, settings, clock


@pytest.fixture
def offline(offline_app: tuple[TestClient, Settings, ManualClock]) -> TestClient:
    return offline_app[0]


@pytest.fixture
def auth(offline_app: tuple[TestClient, Settings, ManualClock]) -> Callable[..., dict[str, str]]:
    _, settings, clock = offline_app

    def headers(*roles: str, user: str = "key-backend") -> dict[str, str]:
        token = mint_token(settings, user, roles=roles, ttl_seconds=600, clock=clock)
        return {"Authorization": f"Bearer {token}"}

    return headers


def post(client: TestClient, headers: dict[str, str], body: object) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(PATH, content=content,
                       headers={**headers, "Content-Type": "application/json"})


# ---- who may post ---------------------------------------------------------------------------


@pytest.mark.parametrize(("roles", "status"), [
    (None, 401), ("bad-token", 401), ((), 403), (("user",), 403), (("admin",), 403),
    (("ingest",), 403), (("analyst",), 403), (("admin", "ingest", "user", "analyst"), 403),
])
def test_only_the_service_role_posts(offline: TestClient, auth: Callable[..., dict[str, str]],
                                     roles: Any, status: int) -> None:
    """An admin is a person: only the key-management backend's word is trusted."""
    if roles is None:
        headers: dict[str, str] = {}
    elif roles == "bad-token":
        headers = {"Authorization": "Bearer not.a.token"}
    else:
        headers = auth(*roles)
    response = post(offline, headers, EVENT)
    assert response.status_code == status
    assert response.json()["error"]["code"] == ("unauthorized" if status == 401 else "forbidden")


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SECRETS))
@pytest.mark.parametrize("where", ["name", "api_key_id", "service", "event_id", "extra"])
def test_a_secret_shaped_value_is_refused_by_field(offline: TestClient, auth: Callable[..., Any],
                                                   shape: str, where: str) -> None:
    secret = SECRETS[shape]
    body = {**EVENT, where if where != "extra" else "notes": secret}
    response = post(offline, auth("service"), body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "secret_refused"
    assert error["field"] == (where if where != "extra" else "notes")
    assert secret not in response.text and secret[:12] not in response.text


@pytest.mark.parametrize("name", ["secret", "key", "api_key", "apiKey", "token", "password",
                                  "client_secret", "private_key", "credentials", "authorization"])
def test_a_field_named_like_a_secret_is_refused(offline: TestClient, auth: Callable[..., Any],
                                                name: str) -> None:
    response = post(offline, auth("service"), {**EVENT, name: "hunter2"})
    assert response.status_code == 422
    assert response.json()["error"] == {
        "code": "secret_refused", "field": name,
        "message": f"{name}: looks like a key secret (named or shaped like one); send "
                   "metadata only, never the key itself"}
    assert "hunter2" not in response.text


def test_nested_and_name_shaped_secrets_are_refused(offline: TestClient,
                                                    auth: Callable[..., Any]) -> None:
    secret = SECRETS["openai"]
    response = post(offline, auth("service"), {**EVENT, "meta": {"deep": [secret]}})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "meta" and secret not in response.text
    # a field *name* shaped like a key: refused without naming it
    response = post(offline, auth("service"), {**EVENT, secret: "x"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "secret_refused"
    assert "field" not in response.json()["error"] and secret not in response.text
    # a name that is not a plain identifier is not shown: it may carry the value
    response = post(offline, auth("service"), {**EVENT, "password=hunter2": "x"})
    assert response.status_code == 422
    assert "field" not in response.json()["error"] and "hunter2" not in response.text
    response = post(offline, auth("service"), {**EVENT, "x y": "z"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert "field" not in response.json()["error"] and "x y" not in response.text


@pytest.mark.parametrize(("body", "status", "field"), [
    ({**EVENT, "color": "blue"}, 422, "color"),
    ({**EVENT, "action": "exploded"}, 422, "action"),
    ({**EVENT, "action": "rotated", "declared_by": "service"}, 422, "declared_by"),
    ({k: v for k, v in EVENT.items() if k != "user_id"}, 422, "user_id"),
    ({k: v for k, v in EVENT.items() if k != "action"}, 422, "action"),
    ({**EVENT, "user_id": "*"}, 422, "user_id"),
    ({**EVENT, "user_id": ""}, 422, "user_id"),
    ({**EVENT, "service": "Open AI"}, 422, "service"),
    ({**EVENT, "name": "n" * 129}, 422, "name"),
    ({**EVENT, "api_key_id": 7}, 422, "api_key_id"),
    ({**EVENT, "event_id": "e" * 121}, 422, "event_id"),
    ({**EVENT, "event_id": "has space"}, 422, "event_id"),
    ({**EVENT, "at": "2026-12-01T12:00:00"}, 422, "at"),
    ({**EVENT, "at": "yesterday"}, 422, "at"),
    ({**EVENT, "at": "2999-01-01T00:00:00Z"}, 422, "at"),
    ({**EVENT, "at": "2001-01-01T00:00:00Z"}, 422, "at"),
    ([EVENT], 422, None),
    (b"{not json", 400, None),
    (b"[" * 100_000, 413, None),
])
def test_invalid_events(offline: TestClient, auth: Callable[..., Any], body: Any, status: int,
                        field: str | None) -> None:
    response = post(offline, auth("service"), body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error.get("field") == field
    assert "exploded" not in error["message"] and "Open AI" not in error["message"]


# ---- accepted: the real broker and engine ---------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    from tests.integration.harness import embedded

    path = tmp_path_factory.mktemp("api-keys")
    with embedded(path / "clickhouse") as client:
        migrate(client, load(dev=True, data_dir=path))
        yield client


@pytest.fixture
def live_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    return kafka_settings.model_copy(update={"data_dir": tmp_path})


@pytest.fixture
def live(live_settings: Settings, clock: ManualClock, engine: Client,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app on the test's topics, with `engine` as the process's shared client (the
    routes' and the audit trail's), its tables emptied."""
    for table in ("api_key_events", "notifications", "audit_log"):
        engine.command(f"TRUNCATE TABLE {live_settings.clickhouse_database}.{table}")
    monkeypatch.setitem(clickhouse._shared, live_settings.dsn, engine)
    with TestClient(create_app(live_settings, clock=clock)) as client:
        yield client


def service(settings: Settings, clock: ManualClock) -> dict[str, str]:
    token = mint_token(settings, "key-backend", roles=("service",), ttl_seconds=600, clock=clock)
    return {"Authorization": f"Bearer {token}", "User-Agent": "keys-backend/1.0"}


def rows(engine: Client, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in engine.query(sql).result_rows]


def test_accepted_event_is_published_stored_and_audited(
        live: TestClient, live_settings: Settings, clock: ManualClock, engine: Client) -> None:
    event_id = str(uuid.uuid4())
    response = post(live, service(live_settings, clock), {**EVENT, "event_id": event_id})
    assert response.status_code == 202, response.text
    assert response.json() == {"event_id": event_id, "notification_id": f"apikey:{event_id}"}

    [(key, value)] = read_topic(live_settings, APIKEY_EVENTS)
    change = msgspec.json.decode(value or b"", type=ApiKeyEvent)
    assert key == b"alice"
    assert (change.event_id, change.declared_by, change.action, change.api_key_id) == (
        event_id, DeclaredBy.SERVICE, "rotated", "key_7f3a")
    assert change.at.timestamp() == clock()
    [(key, value)] = read_topic(live_settings, NOTIFICATIONS)
    note = msgspec.json.decode(value or b"", type=Notification)
    assert key == b"alice"
    assert (note.notification_id, note.user_id, note.template) == (
        f"apikey:{event_id}", "alice", "api_key_rotated")
    assert note.data == {"api_key_id": "key_7f3a", "service": "openai", "name": "production",
                         "declared_by": "service"}
    assert "production" in note.message and note.title == "API key rotated"

    db = live_settings.clickhouse_database
    assert rows(engine, f"SELECT event_id, user_id, action, declared_by FROM {db}.api_key_events "
                        "FINAL") == [(event_id, "alice", "rotated", "service")]
    assert rows(engine, f"SELECT notification_id, template FROM {db}.notifications FINAL") == [
        (f"apikey:{event_id}", "api_key_rotated")]
    [audit] = rows(engine, f"SELECT actor, roles, action, target, user_id, user_agent, details "
                           f"FROM {db}.audit_log FINAL")
    assert audit[:6] == ("key-backend", ["service"], "api_key.rotated", "key_7f3a", "alice",
                         "keys-backend/1.0")
    assert audit[6]["event_id"] == event_id and audit[6]["repeat"] == "false"


def test_a_retry_is_stored_once_and_a_reused_id_is_a_conflict(
        live: TestClient, live_settings: Settings, clock: ManualClock, engine: Client) -> None:
    headers = service(live_settings, clock)
    first = post(live, headers, {**EVENT, "action": "created"})
    assert first.status_code == 202
    event_id = first.json()["event_id"]
    assert str(uuid.UUID(event_id)) == event_id  # made when absent
    clock.advance(30)  # a retry without `at`: another time, the same event
    for _ in range(2):
        again = post(live, headers, {**EVENT, "action": "created", "event_id": event_id})
        assert again.status_code == 202 and again.json() == first.json()
    assert len(read_topic(live_settings, APIKEY_EVENTS)) == 1  # not published again
    assert len(read_topic(live_settings, NOTIFICATIONS)) == 1
    db = live_settings.clickhouse_database
    assert rows(engine, f"SELECT count() FROM {db}.api_key_events FINAL") == [(1,)]
    assert rows(engine, f"SELECT count() FROM {db}.notifications FINAL") == [(1,)]
    assert sorted(rows(engine, f"SELECT details['repeat'] FROM {db}.audit_log FINAL")) == [
        ("false",), ("true",), ("true",)]

    reused = post(live, headers, {**EVENT, "action": "deleted", "event_id": event_id})
    assert reused.status_code == 409
    assert reused.json()["error"]["field"] == "event_id"
    # the same id for another user is that user's own event
    other = post(live, headers, {**EVENT, "user_id": "bob", "event_id": event_id})
    assert other.status_code == 202


def test_503_when_kafka_does_not_confirm(api_settings: Settings, clock: ManualClock) -> None:
    settings = api_settings.model_copy(update={"ingest_timeout_seconds": 0.3})
    app = create_app(settings, clock=clock)
    app.dependency_overrides[get_clickhouse] = _Untouchable  # nothing stored before Kafka
    with TestClient(app) as client:
        response = post(client, service(settings, clock), EVENT)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "unavailable"

"""`POST /v1/admin/announcements` on the real engine and the real broker: an admin's
announcement is made by the template registry, published on `notifications` keyed "*"
(confirmed), audited, and in every user's history at once, unread, also for a user who had
no socket open when it went out; each user's read state and deletion of it are their own."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import create_app
from api.deps import get_clickhouse
from core.auth import ADMIN_ROLE, ANALYST_ROLE, INGEST_ROLE, SERVICE_ROLE, USER_ROLE
from core.settings import Settings
from schemas.notifications import SYSTEM_USER, Notification
from tests.api.notification_world import World, served, users

pytestmark = pytest.mark.integration

PATH = "/v1/admin/announcements"
BODY = {"title": "Maintenance tonight", "message": "Read-only from 02:00 to 03:00 UTC.",
        "type": "warning"}


@pytest.fixture(scope="module")
def module_world(kafka: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with served(kafka, tmp_path_factory) as found:
        yield found


@pytest.fixture
def world(module_world: World) -> World:
    return module_world.reset()


def announce(world: World, body: Any, roles: tuple[str, ...] = (ADMIN_ROLE,),
             admin: str = "admin-1") -> Any:
    return world.http.post(PATH, json=body, headers={
        **world.headers(admin, roles), "User-Agent": "ops-console/1"})


def test_an_announcement_reaches_every_users_history_unread(world: World) -> None:
    """Nobody has a socket open here: the history is how an offline user learns of it."""
    alice, bob = users()
    response = announce(world, BODY)
    assert response.status_code == 201
    sent = response.json()
    notification_id = sent["notification_id"]
    assert notification_id.startswith("announcement:")
    assert len(notification_id) == len("announcement:") + 32
    assert sent == {
        "kind": "notification", "notification_id": notification_id, "user_id": "*",
        "type": "warning", "template": "announcement", "title": BODY["title"],
        "message": BODY["message"], "created_at": sent["created_at"], "data": BODY,
        "schema_version": 1}
    assert datetime.fromisoformat(sent["created_at"]) == datetime.fromtimestamp(world.clock(),
                                                                                tz=UTC)
    for user in (alice, bob):
        items = world.get(user)["items"]
        assert [(item["notification_id"], item["read"], item["type"], item["title"])
                for item in items] == [(notification_id, False, "warning", BODY["title"])]
        assert world.unread(user) == 1
    # each user's state of it is their own
    assert world.post(alice, f"/{notification_id}/read").status_code == 200
    assert world.delete(bob, notification_id).status_code == 204
    assert world.unread(alice) == 0
    assert world.ids(alice) == [notification_id]
    assert world.ids(bob) == []


def test_it_is_published_keyed_star_and_audited(world: World) -> None:
    sent = announce(world, BODY).json()
    published = [message for key, message in world.on_topic(SYSTEM_USER)
                 if isinstance(message, Notification)
                 and message.notification_id == sent["notification_id"]]
    assert len(published) == 1
    assert published[0].user_id == SYSTEM_USER
    assert published[0].title == BODY["title"]
    rows = world.store.query(
        "SELECT actor, roles, action, target, user_id, user_agent, details "
        f"FROM {world.settings.clickhouse_database}.audit_log FINAL").result_rows
    assert rows == [("admin-1", ["admin"], "announcement.send", sent["notification_id"], "*",
                     "ops-console/1", {"type": "warning", "title": BODY["title"]})]


def test_the_type_defaults_to_info(world: World) -> None:
    response = announce(world, {"title": "Hello", "message": "Welcome."})
    assert response.status_code == 201
    assert response.json()["type"] == "info"
    assert response.json()["data"] == {"title": "Hello", "message": "Welcome.", "type": "info"}


@pytest.mark.parametrize(("roles", "status"), [
    (None, 401), ((), 403), ((USER_ROLE,), 403), ((SERVICE_ROLE,), 403),
    ((INGEST_ROLE,), 403), ((ANALYST_ROLE,), 403)])
def test_only_admins_announce(world: World, roles: tuple[str, ...] | None,
                              status: int) -> None:
    headers = {} if roles is None else world.headers("someone", roles)
    response = world.http.post(PATH, json=BODY, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] in {"unauthorized", "forbidden"}
    alice, _ = users()
    assert world.ids(alice) == []


@pytest.mark.parametrize(("body", "field"), [
    ({"message": "m"}, "title"),
    ({"title": "t"}, "message"),
    ({"title": "", "message": "m"}, "title"),
    ({"title": "   ", "message": "m"}, "title"),
    ({"title": "t" * 257, "message": "m"}, "title"),
    ({"title": "t", "message": "m" * 4097}, "message"),
    ({"title": "t", "message": "m", "type": "urgent"}, "type"),
    ({"title": "t", "message": "m", "user_id": "alice"}, "user_id"),
    ({"title": 7, "message": "m"}, "title"),
])
def test_a_bad_body_is_a_422_naming_the_field(world: World, body: dict[str, Any],
                                              field: str) -> None:
    response = announce(world, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    alice, _ = users()
    assert world.ids(alice) == []


def test_a_body_that_is_not_json_is_a_422(world: World) -> None:
    response = world.http.post(PATH, content=b"{not json", headers={
        **world.headers("admin-1", (ADMIN_ROLE,)), "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_the_longest_title_and_message_are_kept_whole(world: World) -> None:
    body = {"title": "t" * 256, "message": "m" * 4096, "type": "error"}
    response = announce(world, body)
    assert response.status_code == 201
    alice, _ = users()
    item = world.get(alice)["items"][0]
    assert (item["title"], item["message"], item["type"]) == (body["title"], body["message"],
                                                              "error")


def test_an_announcement_kafka_does_not_confirm_is_a_503_and_in_nobodys_history(
        world: World) -> None:
    down = world.settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1",
                                             "ingest_timeout_seconds": 0.5})
    app = create_app(down, clock=world.clock)
    app.dependency_overrides[get_clickhouse] = lambda: world.store
    with TestClient(app) as http:
        response = http.post(PATH, json=BODY, headers=world.headers("admin-1", (ADMIN_ROLE,)))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    alice, _ = users()
    assert world.ids(alice) == []

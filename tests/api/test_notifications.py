"""`/v1/notifications` on the real engine and the real broker: what a user sees (their own
and the system-wide ones, never another user's, minus what they deleted), newest first with
a cursor that stays put under inserts, the unread filter and count, and read / unread /
read-all / delete: each change on Kafka keyed by the caller (confirmed) and visible to the
next read at once.

One engine and one set of topics for the module (tests/api/notification_world.py); each
test clears the notification tables and works with users of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import create_app
from api.deps import get_clickhouse
from api.params import encode_cursor
from api.routes import notifications as routes
from core.auth import ANALYST_ROLE, INGEST_ROLE, SERVICE_ROLE, USER_ROLE
from core.outputs import NOTIFICATION_DELETES_OUTPUT, NOTIFICATION_READS_OUTPUT, insert_records
from core.settings import Settings
from schemas.notifications import (
    SYSTEM_USER,
    NotificationDelete,
    NotificationRead,
    NotificationType,
)
from tests.api.notification_world import World, note, served, users

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def module_world(kafka: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with served(kafka, tmp_path_factory) as found:
        yield found


@pytest.fixture
def world(module_world: World) -> World:
    return module_world.reset()


# --- who may call ------------------------------------------------------------------------

ROUTES = (("GET", "/v1/notifications"), ("GET", "/v1/notifications/unread-count"),
          ("POST", "/v1/notifications/read-all"), ("POST", "/v1/notifications/n1/read"),
          ("POST", "/v1/notifications/n1/unread"), ("DELETE", "/v1/notifications/n1"))


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_a_user_or_admin_token(world: World, method: str, path: str) -> None:
    alice, _ = users()
    world.add(note("n1", alice))
    anonymous = world.http.request(method, path)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    for roles in ((INGEST_ROLE,), (SERVICE_ROLE,), (ANALYST_ROLE,)):
        refused = world.http.request(method, path, headers=world.headers(alice, roles))
        assert refused.status_code == 403, (roles, refused.text)
        assert refused.json()["error"]["code"] == "forbidden"
    assert world.get(alice, "/unread-count") == {"unread": 1}  # nothing was changed


# --- what a user sees --------------------------------------------------------------------


def test_a_user_sees_their_own_and_the_system_wide_newest_first_never_another_users(
        world: World) -> None:
    alice, bob = users()
    world.add(note("a-old", alice, 30), note("everyone", SYSTEM_USER, 20),
              note("b-1", bob, 10), note("a-new", alice, 0,
                                         type=NotificationType.ERROR, data={"k": "v"}))
    page = world.get(alice)
    assert page["next_cursor"] is None
    assert [item["notification_id"] for item in page["items"]] == ["a-new", "everyone", "a-old"]
    assert page["items"][0] == {
        "notification_id": "a-new", "type": "error", "title": "title a-new",
        "message": "message a-new", "created_at": "2026-12-01T00:00:00.000Z", "read": False,
        "template": "announcement", "data": {"k": "v"}}
    assert world.ids(bob) == ["b-1", "everyone"]
    assert world.unread(alice) == 3
    assert world.unread(bob) == 2
    # a user parameter never selects another user's rows
    assert world.ids(alice, user_id=bob) == ["a-new", "everyone", "a-old"]


def test_pages_follow_the_cursor_and_stay_put_when_newer_ones_arrive(world: World) -> None:
    alice, bob = users()
    # 25 of alice's, 5 system-wide, 10 of bob's; two share a created_at (the id breaks ties)
    world.add(*(note(f"a{i:02d}", alice, 100 + i) for i in range(25)),
              *(note(f"s{i}", SYSTEM_USER, 100 + 5 * i) for i in range(5)),
              *(note(f"b{i}", bob, 100 + i) for i in range(10)),
              note("tie-1", alice, 50), note("tie-2", alice, 50))
    expected = [f"{n.notification_id}" for n in sorted(
        [note(f"a{i:02d}", alice, 100 + i) for i in range(25)]
        + [note(f"s{i}", SYSTEM_USER, 100 + 5 * i) for i in range(5)]
        + [note("tie-1", alice, 50), note("tie-2", alice, 50)],
        key=lambda n: (n.created_at, n.notification_id), reverse=True)]
    first = world.get(alice, limit=7)
    seen = [item["notification_id"] for item in first["items"]]
    assert len(seen) == 7
    assert first["next_cursor"] is not None
    # newer notifications arrive between the pages: they are on a new first page only
    world.add(note("newer-1", alice, -10), note("newer-2", SYSTEM_USER, -5))
    cursor = first["next_cursor"]
    while cursor is not None:
        page = world.get(alice, limit=7, cursor=cursor)
        assert len(page["items"]) <= 7
        seen += [item["notification_id"] for item in page["items"]]
        cursor = page["next_cursor"]
    assert seen == expected
    assert world.ids(alice, limit=200)[:2] == ["newer-1", "newer-2"]
    assert not any(found.startswith("b") for found in world.ids(alice, limit=3))


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"limit": "ten"},
                                    {"unread": "maybe"}])
def test_a_bad_parameter_is_refused_naming_it(world: World, params: dict[str, Any]) -> None:
    alice, _ = users()
    response = world.http.get("/v1/notifications", params=params, headers=world.headers(alice))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == next(iter(params))


@pytest.mark.parametrize("cursor", ["not-a-cursor", encode_cursor(["usage_events", 1, "e1"]),
                                    encode_cursor(["notifications", "x", "n1"])])
def test_a_cursor_this_route_did_not_return_is_a_400(world: World, cursor: str) -> None:
    alice, _ = users()
    response = world.http.get("/v1/notifications", params={"cursor": cursor},
                              headers=world.headers(alice))
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "cursor"


# --- read and unread ---------------------------------------------------------------------


def test_read_and_unread_change_the_callers_state_on_kafka_and_at_once(world: World) -> None:
    alice, bob = users()
    world.add(note("mine", alice, 10), note("everyone", SYSTEM_USER, 5))
    read = world.post(alice, "/mine/read")
    assert read.status_code == 200
    assert read.json()["notification_id"] == "mine"
    assert read.json()["read"] is True
    assert world.unread(alice) == 1
    assert world.ids(alice, unread="true") == ["everyone"]
    assert [item["read"] for item in world.get(alice)["items"]] == [False, True]

    world.clock.advance(1)
    again = world.post(alice, "/mine/read")  # idempotent
    assert again.status_code == 200
    assert again.json()["read"] is True
    assert world.unread(alice) == 1

    world.clock.advance(1)
    assert world.post(alice, "/everyone/read").json()["read"] is True
    assert world.unread(alice) == 0
    assert world.unread(bob) == 1  # a system-wide notification's state is per user
    assert world.ids(bob, unread="true") == ["everyone"]

    world.clock.advance(1)
    unread = world.post(alice, "/mine/unread")
    assert unread.status_code == 200
    assert unread.json()["read"] is False
    assert world.ids(alice, unread="true") == ["mine"]
    assert world.unread(alice) == 1

    changes = [(key, message) for key, message in world.on_topic(alice, bob, SYSTEM_USER)
               if isinstance(message, NotificationRead)]
    assert [(key, m.notification_id, m.user_id, m.read) for key, m in changes] == [
        (alice.encode(), "mine", alice, True), (alice.encode(), "mine", alice, True),
        (alice.encode(), "everyone", alice, True), (alice.encode(), "mine", alice, False)]
    assert changes[-1][1].at == datetime.fromtimestamp(world.clock(), tz=UTC)


def test_the_latest_read_state_wins_whoever_stored_it(world: World) -> None:
    """A change the pipeline stores (from the bridge, say) counts like the API's own."""
    alice, _ = users()
    world.add(note("n1", alice))
    at = datetime.fromtimestamp(world.clock(), tz=UTC)
    database = world.settings.clickhouse_database
    insert_records(world.store, NOTIFICATION_READS_OUTPUT, database, [
        NotificationRead(notification_id="n1", user_id=alice, read=True, at=at)])
    assert world.unread(alice) == 0
    insert_records(world.store, NOTIFICATION_READS_OUTPUT, database, [
        NotificationRead(notification_id="n1", user_id=alice, read=False,
                         at=at - timedelta(seconds=5))])  # an older change, stored late
    assert world.unread(alice) == 0
    insert_records(world.store, NOTIFICATION_READS_OUTPUT, database, [
        NotificationRead(notification_id="n1", user_id=alice, read=False,
                         at=at + timedelta(seconds=5))])
    assert world.unread(alice) == 1
    assert world.get(alice)["items"][0]["read"] is False


def test_another_users_notification_is_404_and_never_listed(world: World) -> None:
    alice, bob = users()
    world.add(note("bobs", bob))
    for method, path in (("POST", "/bobs/read"), ("POST", "/bobs/unread"),
                         ("DELETE", "/bobs"), ("POST", "/nothing-like-it/read")):
        response = world.http.request(method, f"/v1/notifications{path}",
                                      headers=world.headers(alice))
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "not_found"
    assert world.ids(alice) == []
    assert world.unread(alice) == 0
    assert world.unread(bob) == 1  # untouched
    assert world.on_topic(alice, bob) == []  # nothing was published


def test_an_id_out_of_bounds_is_a_422(world: World) -> None:
    alice, _ = users()
    response = world.post(alice, f"/{'x' * 129}/read")
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "notification_id"


# --- read-all ----------------------------------------------------------------------------


def test_read_all_marks_every_unread_one_the_caller_sees(world: World) -> None:
    alice, bob = users()
    world.add(*(note(f"a{i}", alice, i) for i in range(6)), note("everyone", SYSTEM_USER, 9),
              note("bobs", bob))
    assert world.post(alice, "/a2/read").status_code == 200
    world.clock.advance(1)
    response = world.post(alice, "/read-all")
    assert response.status_code == 200
    assert response.json() == {"updated": 6, "remaining": 0}  # a2 was read already
    assert world.unread(alice) == 0
    assert world.ids(alice, unread="true") == []
    assert world.unread(bob) == 2  # bob's own and the system-wide one
    reads = [(key, m.notification_id) for key, m in world.on_topic(alice, bob, SYSTEM_USER)
             if isinstance(m, NotificationRead) and m.notification_id != "a2"]
    assert sorted(reads) == sorted((alice.encode(), n) for n in (
        "a0", "a1", "a3", "a4", "a5", "everyone"))
    world.clock.advance(1)
    assert world.post(alice, "/read-all").json() == {"updated": 0, "remaining": 0}


def test_read_all_is_bounded_and_says_how_many_are_left(world: World,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _ = users()
    monkeypatch.setattr(routes, "READ_ALL_MAX", 4)
    world.add(*(note(f"a{i}", alice, i) for i in range(10)))
    first = world.post(alice, "/read-all").json()
    assert first == {"updated": 4, "remaining": 6}
    assert world.ids(alice, unread="true") == [f"a{i}" for i in range(4, 10)]  # newest first
    world.clock.advance(1)
    assert world.post(alice, "/read-all").json() == {"updated": 4, "remaining": 2}
    world.clock.advance(1)
    assert world.post(alice, "/read-all").json() == {"updated": 2, "remaining": 0}
    assert world.unread(alice) == 0


# --- delete ------------------------------------------------------------------------------


def test_delete_hides_it_from_the_caller_only(world: World) -> None:
    """And is idempotent: deleting again answers 204 and publishes nothing more."""
    alice, bob = users()
    world.add(note("mine", alice, 5), note("everyone", SYSTEM_USER))
    assert world.delete(alice, "everyone").status_code == 204
    assert world.ids(alice) == ["mine"]
    assert world.unread(alice) == 1
    assert world.ids(bob) == ["everyone"]  # a system-wide one stays in everyone else's
    assert world.unread(bob) == 1
    for path in ("/everyone/read", "/everyone/unread"):
        assert world.post(alice, path).status_code == 404, path
    world.clock.advance(1)
    assert world.delete(alice, "everyone").status_code == 204  # again: idempotent, no change
    response = world.delete(alice, "mine")
    assert response.status_code == 204
    assert response.content == b""
    assert world.ids(alice) == []
    assert world.post(alice, "/read-all").json() == {"updated": 0, "remaining": 0}
    assert world.post(bob, "/everyone/read").status_code == 200
    deletes = [(key, m.notification_id, m.user_id)
               for key, m in world.on_topic(alice, bob, SYSTEM_USER)
               if isinstance(m, NotificationDelete)]
    assert deletes == [(alice.encode(), "everyone", alice), (alice.encode(), "mine", alice)]


def test_a_delete_is_final_a_later_read_does_not_bring_it_back(world: World) -> None:
    alice, _ = users()
    world.add(note("n1", alice))
    assert world.delete(alice, "n1").status_code == 204
    database = world.settings.clickhouse_database
    later = datetime.fromtimestamp(world.clock() + 60, tz=UTC)
    insert_records(world.store, NOTIFICATION_READS_OUTPUT, database, [
        NotificationRead(notification_id="n1", user_id=alice, read=False, at=later)])
    insert_records(world.store, NOTIFICATION_DELETES_OUTPUT, database, [  # a replayed twin
        NotificationDelete(notification_id="n1", user_id=alice, at=later)])
    assert world.ids(alice) == []
    assert world.unread(alice) == 0


# --- Kafka down --------------------------------------------------------------------------


def test_a_change_kafka_does_not_confirm_is_a_503_and_not_stored(world: World) -> None:
    alice, _ = users()
    world.add(note("n1", alice))
    down = world.settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1",
                                             "ingest_timeout_seconds": 0.5})
    app = create_app(down, clock=world.clock)
    app.dependency_overrides[get_clickhouse] = lambda: world.store
    headers = world.headers(alice)
    with TestClient(app) as http:
        for method, path in (("POST", "/v1/notifications/n1/read"),
                             ("POST", "/v1/notifications/read-all"),
                             ("DELETE", "/v1/notifications/n1")):
            response = http.request(method, path, headers=headers)
            assert response.status_code == 503, (method, path, response.text)
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "unavailable"
    assert world.get(alice)["items"][0]["read"] is False
    assert world.unread(alice) == 1


def test_a_role_less_token_and_an_admin_token_read_their_own(world: World) -> None:
    alice, bob = users()
    world.add(note("a", alice), note("b", bob))
    for roles in ((USER_ROLE,), ("admin",)):
        response = world.http.get("/v1/notifications", headers=world.headers(alice, roles))
        assert [item["notification_id"] for item in response.json()["items"]] == ["a"]

"""A user's notifications with read state shared with the WebSocket (DESIGN §8).

Who: `user` (a token without roles acts as one) and `admin`, each for the token's own `sub`:
the owner never comes from a parameter. A notification the caller does not see (another
user's, one they deleted, an unknown id) is 404 to every route: nothing tells them apart.

Each change is a message on `notifications` keyed by the CALLER (a `NotificationRead` or a
`NotificationDelete` with the caller's `user_id`, also for a system-wide notification),
answered once Kafka confirmed it (503 with Retry-After otherwise) and stored at once, so the
next read shows it. The bridge forwards a read-state change to the caller's other sockets
(`notification_read`); the pipeline stores what any process put on the topic (the bridge's
`mark_notification_read` included), one copy kept. Marking read twice is harmless: the
latest change wins. Not audited: a user's own notifications are not an admin action.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from api import notifications
from api.deps import ClickHouseDep, OwnerDep, PublisherDep, SettingsDep
from api.errors import APIError
from api.ingest import EventProducer
from api.notifications import NotificationItem, NotificationPage, UnreadCount
from api.params import decode_cursor, encode_cursor
from api.responses import MsgspecResponse, described, failures
from core.clock import Clock
from core.outputs import NOTIFICATION_DELETES_OUTPUT, NOTIFICATION_READS_OUTPUT
from core.settings import Settings
from schemas.notifications import NotificationDelete, NotificationRead

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])

MAX_LIMIT = 200
READ_ALL_MAX = 10_000  # notifications one `read-all` marks; `remaining` says how many are left
EXAMPLE_ID = "welcome-1"  # the examples' notification (tests/api/test_openapi.py seeds it)
EXAMPLE_DELETE_ID = "welcome-2"
_CURSOR_KIND = "notifications"  # a cursor names its route: another route's cursor is refused
_CURSOR: Any = tuple[Literal["notifications"], int, str]  # (kind, created_at ms, id)


class ReadAll(msgspec.Struct, frozen=True):
    updated: int  # notifications this call marked read
    remaining: int  # unread ones left (more than READ_ALL_MAX were unread): call again


def _owner(user: OwnerDep) -> str:
    return user.user_id


OwnerIdDep = Annotated[str, Depends(_owner)]
IdPath = Annotated[str, Path(
    min_length=1, max_length=128, description="the notification's `notification_id`",
    examples=[EXAMPLE_ID])]

_AUTH_FAILURES = {401: "no valid bearer token",
                  403: "the token holds neither the user nor the admin role"}
_STORE_DOWN = {503: "the store is unreachable; retry after `Retry-After` seconds"}
_PUBLISH_DOWN = {503: "Kafka did not confirm the change, or the store did not take it (it "
                      "is on Kafka then: retrying is harmless); retry after `Retry-After`"}
_NOT_FOUND = {404: "no notification with this id that the caller sees (another user's, one "
                   "they deleted, or none)"}
_BAD_ID = {422: "the id is empty or longer than 128 characters"}


def _now(request: Request) -> datetime:
    clock: Clock = request.app.state.clock
    return datetime.fromtimestamp(clock(), tz=UTC)


@router.get("", responses={
    **described(NotificationPage, description="the caller's notifications, newest first"),
    **failures({400: "a `cursor` this route did not return",
                422: "`limit` outside 1..200 or `unread` not a boolean (the field says which)",
                **_AUTH_FAILURES, **_STORE_DOWN}),
})
def list_notifications(
    owner: OwnerIdDep,
    settings: SettingsDep,
    client: ClickHouseDep,
    unread: Annotated[bool, Query(
        description="only the ones the caller has not read", examples=[True])] = False,
    limit: Annotated[int, Query(
        ge=1, le=MAX_LIMIT, description="notifications per page", examples=[50])] = 50,
    cursor: Annotated[str | None, Query(
        max_length=512, description="`next_cursor` of the previous page",
        examples=[encode_cursor([_CURSOR_KIND, 1764590400000, EXAMPLE_ID])])] = None,
) -> MsgspecResponse:
    """The caller's notification history, system-wide ones (announcements, provider
    incidents) included, without those the caller deleted; each with the caller's `read`.

    Newest first by (`created_at`, `notification_id`), keyset pagination: a page continues
    strictly below the previous one, so notifications arriving meanwhile never shift or
    repeat later pages (they are on the first page)."""
    before = None
    if cursor is not None:
        _kind, created_ms, notification_id = decode_cursor(cursor, _CURSOR)
        before = (created_ms, notification_id)
    items, last = notifications.page(client, settings.clickhouse_database, owner, limit,
                                     before, unread_only=unread)
    next_cursor = None if last is None else encode_cursor([_CURSOR_KIND, *last])
    return MsgspecResponse(NotificationPage(items=items, next_cursor=next_cursor))


@router.get("/unread-count", responses={
    **described(UnreadCount, description="how many the caller sees unread"),
    **failures({**_AUTH_FAILURES, **_STORE_DOWN}),
})
def unread_count(owner: OwnerIdDep, settings: SettingsDep,
                 client: ClickHouseDep) -> MsgspecResponse:
    """How many notifications the caller sees and has not read (a badge's number)."""
    count = notifications.unread_count(client, settings.clickhouse_database, owner)
    return MsgspecResponse(UnreadCount(unread=count))


@router.post("/read-all", responses={
    **described(ReadAll, description="how many were marked read, and how many are left"),
    **failures({**_AUTH_FAILURES, **_PUBLISH_DOWN}),
})
def read_all(owner: OwnerIdDep, request: Request, settings: SettingsDep,
             client: ClickHouseDep, publisher: PublisherDep) -> MsgspecResponse:
    """Marks read every notification the caller sees unread: one read-state change each,
    published in one confirmed batch and stored in one insert.

    Bounded: at most 10,000 (the newest) a call; `remaining` counts the unread ones left,
    so a client calls again while it is not 0."""
    database = settings.clickhouse_database
    ids = notifications.unread_ids(client, database, owner, READ_ALL_MAX)
    at = _now(request)
    reads = [NotificationRead(notification_id=notification_id, user_id=owner, read=True, at=at)
             for notification_id in ids]
    if reads:
        notifications.publish(publisher, client, settings, NOTIFICATION_READS_OUTPUT, owner,
                              reads)
    remaining = (notifications.unread_count(client, database, owner)
                 if len(ids) == READ_ALL_MAX else 0)
    logger.info("read-all for %s: %s marked, %s left", owner, len(ids), remaining)
    return MsgspecResponse(ReadAll(updated=len(ids), remaining=remaining))


def _mark(owner: str, notification_id: str, read: bool, request: Request,
          settings: Settings, client: Client, publisher: EventProducer) -> MsgspecResponse:
    found = _visible(client, settings.clickhouse_database, owner, notification_id)
    change = NotificationRead(notification_id=notification_id, user_id=owner, read=read,
                              at=_now(request))
    notifications.publish(publisher, client, settings, NOTIFICATION_READS_OUTPUT, owner,
                          [change])
    return MsgspecResponse(msgspec.structs.replace(found, read=read))


def _visible(client: Client, database: str, owner: str,
             notification_id: str) -> NotificationItem:
    """The notification as the caller sees it, else 404."""
    found = notifications.find(client, database, owner, notification_id)
    if found is None:
        raise _not_found(notification_id)
    return found


def _not_found(notification_id: str) -> APIError:
    return APIError(404, "not_found", f"no notification {notification_id[:128]!r}",
                    field="notification_id")


_MARK_RESPONSES = {**described(NotificationItem, description="the notification, as now seen"),
                   **failures({**_NOT_FOUND, **_BAD_ID, **_AUTH_FAILURES, **_PUBLISH_DOWN})}


@router.post("/{notification_id}/read", responses=_MARK_RESPONSES)
def mark_read(notification_id: IdPath, owner: OwnerIdDep, request: Request,
              settings: SettingsDep, client: ClickHouseDep,
              publisher: PublisherDep) -> MsgspecResponse:
    """Marks the notification read for the caller (for a system-wide one: for the caller
    only). Idempotent. The caller's sockets get `notification_read`."""
    return _mark(owner, notification_id, True, request, settings, client, publisher)


@router.post("/{notification_id}/unread", responses=_MARK_RESPONSES)
def mark_unread(notification_id: IdPath, owner: OwnerIdDep, request: Request,
                settings: SettingsDep, client: ClickHouseDep,
                publisher: PublisherDep) -> MsgspecResponse:
    """Marks the notification unread for the caller. Idempotent. The caller's sockets get
    `notification_read` (with `read: false`)."""
    return _mark(owner, notification_id, False, request, settings, client, publisher)


@router.delete("/{notification_id}", status_code=204, response_class=Response, responses={
    204: {"description": "deleted from the caller's history (now or before)"},
    **failures({404: "no notification with this id that the caller sees or deleted "
                     "(another user's, or none)", **_BAD_ID, **_AUTH_FAILURES, **_PUBLISH_DOWN}),
})
def delete_notification(
    notification_id: Annotated[str, Path(
        min_length=1, max_length=128, description="the notification's `notification_id`",
        examples=[EXAMPLE_DELETE_ID])],
    owner: OwnerIdDep, request: Request, settings: SettingsDep, client: ClickHouseDep,
    publisher: PublisherDep,
) -> Response:
    """Removes the notification from the caller's history for good (a system-wide one: from
    the caller's only; other users still see it): it is no longer listed or counted, and
    marking it is 404. Idempotent: deleting it again answers 204 (a retry after a lost
    answer succeeds) and changes nothing."""
    database = settings.clickhouse_database
    if notifications.find(client, database, owner, notification_id) is None:
        if notifications.deleted_by(client, database, owner, notification_id):
            return Response(status_code=204)
        raise _not_found(notification_id)
    removal = NotificationDelete(notification_id=notification_id, user_id=owner,
                                 at=_now(request))
    notifications.publish(publisher, client, settings, NOTIFICATION_DELETES_OUTPUT, owner,
                          [removal])
    return Response(status_code=204)

"""A user's notification history as the store holds it (DESIGN §8, `/v1/notifications`).

What user U sees: the notifications addressed to U or to everyone (`user_id` "*": an
announcement, a provider incident), minus those U deleted (`notification_deletes`), each
read or unread by U's latest `notification_reads` row (none: unread). A system-wide
notification is one row; each user's read state and deletion of it are that user's rows.

    page(client, db, user, limit, before, unread_only)  newest first (created_at,
                                 notification_id), keyset below `before`: (items, next position)
    unread_count(client, db, user)
    find(client, db, user, notification_id)             one visible notification, or None
    deleted_by(client, db, user, notification_id)       whether the user deleted it
    unread_ids(client, db, user, limit)                 the newest unread ones' ids
    publish(publisher, client, settings, output, key, records)
                                 onto `notifications` (confirmed), then into the store

Every table is read FINAL (the API and the pipeline may both write a record: one copy
counts) and every query leads with `user_id`, the tables' primary-key prefix: the user's
own rows and the "*" rows are read, never another user's. The read state and deletions
are matched as sets of the user's own rows, so a page costs one range of `notifications`
plus the user's reads and deletes, whatever the other users hold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from clickhouse_connect.driver.client import Client

from api.errors import APIError
from api.ingest import EventProducer
from api.params import iso
from core.outputs import Output, insert_records
from core.settings import Settings
from core.topics import NOTIFICATIONS
from schemas.notifications import SYSTEM_USER, NotificationType

logger = logging.getLogger(__name__)

Position = tuple[int, str]  # (created_at in epoch ms, notification_id): the keyset


class NotificationItem(msgspec.Struct, frozen=True):
    """A notification as one user sees it: `read` is that user's state of it."""

    notification_id: str
    type: NotificationType
    title: str
    message: str
    created_at: str  # RFC 3339 UTC, milliseconds
    read: bool
    template: str  # the template it was made from (core.templates), e.g. "announcement"
    data: dict[str, str]  # the template's fields


class NotificationPage(msgspec.Struct, frozen=True):
    items: list[NotificationItem]
    next_cursor: str | None


class UnreadCount(msgspec.Struct, frozen=True):
    unread: int


_TYPES = frozenset(NotificationType)
_encoder = msgspec.json.Encoder()


def _item(row: Sequence[Any]) -> NotificationItem:
    notification_id, kind, title, message, created_ms, template, data, read = row
    return NotificationItem(
        notification_id=notification_id,
        # a row written without a type (by hand) reads as info rather than failing the page
        type=NotificationType(kind) if kind in _TYPES else NotificationType.INFO,
        title=title, message=message, created_at=iso(int(created_ms)), read=bool(read),
        template=template, data=dict(data))


def _visible(database: str) -> str:
    """FROM and WHERE of the notifications `{user_id}` sees, and `is_read`, their read state.

    The read state is the latest row per notification (FINAL in the inner query: the filter
    on `read` applies to the row that won, never to an older one)."""
    return (
        f"notification_id IN (SELECT notification_id FROM (SELECT notification_id, read "
        f"FROM {database}.notification_reads FINAL WHERE user_id = {{user_id:String}}) "
        f"WHERE read) AS is_read "
        f"FROM {database}.notifications FINAL "
        f"WHERE user_id IN ({{user_id:String}}, '{SYSTEM_USER}') "
        f"AND notification_id NOT IN (SELECT notification_id "
        f"FROM {database}.notification_deletes FINAL WHERE user_id = {{user_id:String}})"
    )


_ITEM_COLUMNS = ("notification_id, type, title, message, toUnixTimestamp64Milli(created_at), "
                 "template, data, ")


def page(client: Client, database: str, user_id: str, limit: int, before: Position | None,
         *, unread_only: bool = False) -> tuple[list[NotificationItem], Position | None]:
    """A page newest first, strictly below `before`, and the next page's position (None on
    the last page: one row more than asked for tells)."""
    sql = f"SELECT {_ITEM_COLUMNS}{_visible(database)}"
    params: dict[str, Any] = {"user_id": user_id, "limit": limit + 1}
    if unread_only:
        sql += " AND NOT is_read"
    if before is not None:
        sql += (" AND (created_at, notification_id) < "
                "(fromUnixTimestamp64Milli({before_ms:Int64}, 'UTC'), {before_id:String})")
        params["before_ms"], params["before_id"] = before
    sql += " ORDER BY created_at DESC, notification_id DESC LIMIT {limit:UInt32}"
    rows = client.query(sql, parameters=params).result_rows
    more = len(rows) > limit
    rows = rows[:limit]
    position = (int(rows[-1][4]), str(rows[-1][0])) if more else None
    return [_item(row) for row in rows], position


def unread_count(client: Client, database: str, user_id: str) -> int:
    sql = f"SELECT count() FROM (SELECT {_visible(database)} AND NOT is_read)"
    return int(client.query(sql, parameters={"user_id": user_id}).result_rows[0][0])


def find(client: Client, database: str, user_id: str, notification_id: str
         ) -> NotificationItem | None:
    """The notification if `user_id` sees it (theirs or everyone's, not deleted by them)."""
    sql = (f"SELECT {_ITEM_COLUMNS}{_visible(database)} "
           "AND notification_id = {notification_id:String} "
           "ORDER BY created_at DESC LIMIT 1")
    rows = client.query(sql, parameters={"user_id": user_id,
                                         "notification_id": notification_id}).result_rows
    return _item(rows[0]) if rows else None


def deleted_by(client: Client, database: str, user_id: str, notification_id: str) -> bool:
    """Whether `user_id` deleted this notification (theirs or everyone's) from their
    history."""
    sql = (f"SELECT count() FROM {database}.notification_deletes FINAL "
           "WHERE user_id = {user_id:String} AND notification_id = {notification_id:String}")
    rows = client.query(sql, parameters={"user_id": user_id,
                                         "notification_id": notification_id}).result_rows
    return bool(rows[0][0])


def unread_ids(client: Client, database: str, user_id: str, limit: int) -> list[str]:
    """The ids of at most `limit` notifications `user_id` sees unread, newest first."""
    sql = (f"SELECT notification_id, {_visible(database)} AND NOT is_read "
           "ORDER BY created_at DESC, notification_id DESC LIMIT {limit:UInt32}")
    rows = client.query(sql, parameters={"user_id": user_id, "limit": limit}).result_rows
    return [str(row[0]) for row in rows]


# ---- writes ---------------------------------------------------------------------------------


def publish(publisher: EventProducer, client: Client, settings: Settings, output: Output,
            key: str, records: Sequence[msgspec.Struct]) -> None:
    """`records` onto `notifications` keyed `key`, confirmed by Kafka, then stored at once
    (the pipeline stores them too, from the topic: the table keeps one copy), so the next
    read shows them. 503 with Retry-After when Kafka does not confirm (nothing is stored) or
    the store refuses (they are on Kafka: the pipeline stores them; retrying is harmless)."""
    encoded = [(key.encode(), _encoder.encode(record)) for record in records]
    reason = publisher.send(encoded, topic=settings.topic(NOTIFICATIONS))
    if reason is not None:
        logger.warning("notifications not published (%s records): %s", len(records), reason)
        raise APIError(503, "unavailable", f"Kafka did not confirm: {reason}",
                       headers={"Retry-After": "1"})
    try:
        insert_records(client, output, settings.clickhouse_database, list(records))
    except Exception:  # clickhouse-connect and chDB raise unrelated types
        logger.exception("%s published but not stored (%s records)", output.name, len(records))
        raise APIError(503, "unavailable", "published, but not stored yet; retry",
                       headers={"Retry-After": "1"}) from None

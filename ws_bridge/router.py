"""From a Kafka message to the connections it belongs to.

`prepare` runs on the Kafka thread: it decodes and validates the value (only for users
with an open connection: the feed checks the key first), checks that the value's
`user_id` equals the key, and encodes the frame once. `dispatch` runs on the event loop
and offers that one encoded frame to each of the user's connections.

A broadcast is queued on every connection at once (cheap), but written in slices of
`FANOUT_SLICE_S` of loop time, so per-user frames and client events that arrive meanwhile
are not stuck behind 10,000 socket writes (a per-user frame flushes its own connection,
queued broadcast first, so each connection still sees them in order).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import msgspec

from core.clock import Clock
from core.settings import Settings
from core.topics import APIKEY_EVENTS, NOTIFICATIONS, USAGE_ALERTS, USAGE_EVENTS, USAGE_STATS
from schemas.alerts import Alert
from schemas.api_keys import ApiKeyEvent
from schemas.events import InvalidEvent, decode_event
from schemas.notifications import (
    SYSTEM_USER,
    Notification,
    NotificationDelete,
    NotificationMessage,
    NotificationRead,
)
from schemas.stats import StatsRecord
from schemas.ws import ApiKeyUpdate, frame_prefix
from ws_bridge.connection import (
    ACTIVITY,
    ALERTS,
    API_KEYS,
    CURSOR_ALERTS,
    CURSOR_API_KEYS,
    CURSOR_NOTIFICATIONS,
    STATS,
    Connection,
)
from ws_bridge.connection import (
    NOTIFICATIONS as NOTIFICATIONS_BIT,
)
from ws_bridge.registry import Registry
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)

FANOUT_SLICE_S = 0.002  # loop time per slice of a broadcast's socket writes
ORIGIN_HEADER = "keypulse-origin"  # connection id that caused a notifications message
BROADCAST_KEY = SYSTEM_USER.encode()


class Kind(IntEnum):
    STATS = 1
    ALERTS = 2
    NOTIFICATIONS = 3
    API_KEYS = 4
    ACTIVITY = 5


class Mode(IntEnum):
    STATS = 1  # coalesced per (service, window)
    CURSOR = 2  # alert / notification / API-key update: never dropped, carries a cursor
    MUST = 3  # never dropped
    DROPPABLE = 4  # activity
    BROADCAST = 5  # system_notification to every connection


class Routed:
    """One prepared message: who gets it, how, and its encoded frame head."""

    __slots__ = ("channel", "coalesce", "cursor_topic", "mode", "offset", "origin", "prefix",
                 "timestamp", "user_id")

    def __init__(self, user_id: str, channel: int, mode: Mode, prefix: str, *, offset: int = -1,
                 cursor_topic: int = 0, coalesce: tuple[str, int] = ("", 0),
                 origin: str | None = None, timestamp: int = 0) -> None:
        self.user_id = user_id
        self.channel = channel
        self.mode = mode
        self.prefix = prefix
        self.offset = offset
        self.cursor_topic = cursor_topic
        self.coalesce = coalesce
        self.origin = origin
        self.timestamp = timestamp


_stats = msgspec.json.Decoder(StatsRecord)
_alert = msgspec.json.Decoder(Alert)
_note = msgspec.json.Decoder(NotificationMessage)  # type: ignore[arg-type]
_apikey = msgspec.json.Decoder(ApiKeyEvent)
# a user's own notification message → its frame (a read or a delete reaches the user's
# other sockets: the one that caused it, named by ORIGIN_HEADER, only moves its cursor)
_NOTE_EVENTS: dict[type, str] = {
    Notification: "new_notification",
    NotificationRead: "notification_read",
    NotificationDelete: "notification_deleted",
}


class Router:
    def __init__(self, settings: Settings, registry: Registry, stats: BridgeStats,
                 clock: Clock) -> None:
        self.registry = registry
        self.stats = stats
        self.clock = clock
        self.kinds: dict[str, Kind] = {
            settings.topic(USAGE_STATS): Kind.STATS,
            settings.topic(USAGE_ALERTS): Kind.ALERTS,
            settings.topic(NOTIFICATIONS): Kind.NOTIFICATIONS,
            settings.topic(APIKEY_EVENTS): Kind.API_KEYS,
            settings.topic(USAGE_EVENTS): Kind.ACTIVITY,
        }
        self._fanout: deque[Connection] = deque()  # connections with a broadcast to write
        self._fanout_scheduled = False

    # -- Kafka thread ---------------------------------------------------------------------

    def prepare(self, kind: Kind, key: bytes, value: bytes, offset: int, *,
                origin: str | None = None, timestamp: int = 0) -> Routed | None:
        """Decode, check and encode one message; None (counted) if it is not deliverable."""
        try:
            routed = self._prepare(kind, key.decode(), value, offset, origin)
        except (msgspec.ValidationError, msgspec.DecodeError, InvalidEvent, UnicodeDecodeError,
                ValueError) as exc:
            self.stats.decode_errors += 1
            logger.debug("undeliverable message (kind %s, offset %s): %s", kind.name, offset, exc)
            return None
        if routed is not None:
            routed.timestamp = timestamp
        else:
            self.stats.decode_errors += 1
        return routed

    def _prepare(self, kind: Kind, user_id: str, value: bytes, offset: int,
                 origin: str | None) -> Routed | None:
        ts = int(self.clock() * 1000)
        if kind is Kind.STATS:
            rec = _stats.decode(value)
            if rec.user_id != user_id:
                return None
            window = int(rec.window_start.timestamp())
            # `"final": true`: it replaces the live tier's provisional figures (live.py).
            # The record goes as it came, once checked (a JSON object: it ends with "}" but
            # for whitespace); a close brings 30,000 of them at 10,000 users, and encoding
            # each again cost a third of its handling.
            data = value.rstrip()[:-1].decode() + ',"final":true}'
            return Routed(user_id, STATS, Mode.STATS,
                          f'{{"event":"usage_stats_update","data":{data},"ts":{ts},',
                          coalesce=(rec.service, window))
        if kind is Kind.ALERTS:
            alert = _alert.decode(value)
            if alert.user_id != user_id:
                return None
            return Routed(user_id, ALERTS, Mode.CURSOR, frame_prefix("usage_alert", alert, ts),
                          offset=offset, cursor_topic=CURSOR_ALERTS)
        if kind is Kind.NOTIFICATIONS:
            note = _note.decode(value)
            if note.user_id != user_id:
                return None
            if isinstance(note, Notification) and user_id == SYSTEM_USER:
                return Routed(user_id, 0, Mode.BROADCAST,
                              frame_prefix("system_notification", note, ts))
            if user_id == SYSTEM_USER:
                return None
            event = _NOTE_EVENTS[type(note)]
            return Routed(user_id, NOTIFICATIONS_BIT, Mode.CURSOR, frame_prefix(event, note, ts),
                          offset=offset, cursor_topic=CURSOR_NOTIFICATIONS, origin=origin)
        if kind is Kind.API_KEYS:
            change = _apikey.decode(value)
            if change.user_id != user_id:
                return None
            update = ApiKeyUpdate(action=change.action, api_key_id=change.api_key_id,
                                  service=change.service, name=change.name, at=change.at,
                                  event_id=change.event_id, declared_by=change.declared_by)
            return Routed(user_id, API_KEYS, Mode.CURSOR,
                          frame_prefix("api_key_update", update, ts), offset=offset,
                          cursor_topic=CURSOR_API_KEYS)
        usage = decode_event(value)
        if usage.user_id != user_id:
            return None
        return Routed(user_id, ACTIVITY, Mode.DROPPABLE, frame_prefix("usage_event", usage, ts))

    # -- event loop -----------------------------------------------------------------------

    def dispatch(self, batch: Iterable[Routed],
                 hold: Callable[[Connection], None] | None = None) -> None:
        """Offer each prepared message to its user's connections (or everyone's). Stats
        frames are written at the end of the batch, one write per connection, or handed to
        `hold` (the live tier's: they go out with the user's next update, within a second)."""
        by_user = self.registry.by_user
        routed_count = 0
        # Stats frames (a window closing brings one per service of every user at once) are
        # queued, then written in one go per connection at the end of the batch.
        flush: dict[int, Connection] = {}
        for routed in batch:
            routed_count += 1
            if routed.mode is Mode.BROADCAST:
                self._broadcast(routed.prefix)
                continue
            conns = by_user.get(routed.user_id)
            if not conns:
                continue
            channel = routed.channel
            mode = routed.mode
            for conn in conns:
                if not conn.channels & channel:
                    continue
                if mode is Mode.STATS:
                    conn.offer_stats(routed.prefix, routed.coalesce, flush=False)
                    flush[id(conn)] = conn
                elif mode is Mode.CURSOR:
                    if routed.origin is not None and routed.origin == conn.connection_id:
                        # the sender's own read-state change: not echoed, but the
                        # position moves past it
                        conn.offer_cursor_skip(routed.cursor_topic, routed.offset)
                        continue
                    conn.offer_cursor(routed.prefix, routed.cursor_topic, routed.offset)
                elif mode is Mode.MUST:
                    conn.offer_must(routed.prefix)
                else:
                    conn.offer_droppable(routed.prefix)
        if hold is not None:
            for conn in flush.values():
                hold(conn)
        else:
            for conn in flush.values():
                conn.flush()
        self.stats.messages_routed += routed_count
        self.stats.delivered(batch)  # one observation per batch (stats.py)

    def _broadcast(self, prefix: str) -> None:
        fanout = self._fanout
        for conn in self.registry:
            if conn.offer_broadcast(prefix):
                fanout.append(conn)
        if fanout and not self._fanout_scheduled:
            self._fanout_scheduled = True
            asyncio.get_running_loop().call_soon(self._fanout_step)

    def _fanout_step(self) -> None:
        """Write queued broadcasts for `FANOUT_SLICE_S`, then yield to the loop."""
        fanout = self._fanout
        deadline = time.perf_counter() + FANOUT_SLICE_S
        while fanout:
            for _ in range(min(64, len(fanout))):
                fanout.popleft().flush()
            if time.perf_counter() >= deadline:
                break
        if fanout:
            asyncio.get_running_loop().call_soon(self._fanout_step)
        else:
            self._fanout_scheduled = False


def utc_now(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock(), tz=UTC)


def origin_of(msg: Any) -> str | None:
    """The connection id in a Kafka message's origin header, if any."""
    for name, value in msg.headers() or ():
        if name == ORIGIN_HEADER and value is not None:
            return bytes(value).decode(errors="replace")
    return None

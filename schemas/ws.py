"""The WebSocket protocol (DESIGN §7): envelope, every client event and every server event.

Every frame is a JSON object ``{"event": NAME, "data": {...}}``. Server frames also carry
``"ts"`` (epoch milliseconds when the bridge built the frame) and ``"seq"`` (1, 2, 3… per
connection); alert, notification and API-key frames (CURSOR_EVENTS) also carry ``"cursor"``,
an opaque resume token.

    client → server                         server → client
    authenticate {token, resume_from?}      authenticated {user_id, roles, connection_id, cursor}
    subscribe / unsubscribe {channels}      subscribed {channels}
    track_usage {usage event}               error {code, message}
    mark_notification_read {id, read}       usage_stats_update {stats record, final}
    subscribe_monitoring {} (admin)         usage_alert {alert}               (+cursor)
    api_key_created|updated|deleted         usage_event {usage event}         (channel activity)
        {api_key_id, service, name}         new_notification {notification}  (+cursor)
    ping {nonce?}                           notification_read {id, read, …}   (+cursor)
                                            notification_deleted {id, user_id, at} (+cursor)
                                            system_notification {notification}
                                            api_key_update {action, api_key_id, service, name,
                                                            event_id, declared_by} (+cursor)
                                            system_stats {…}                  (admins)
                                            resync_required {reason, cursor}
                                            pong {nonce?}

`subscribed`, `notification_read`, `notification_deleted` and `resync_required` extend
DESIGN §7 (docs/websocket.md).
The `apikey.events` message (`ApiKeyEvent`) is in schemas/api_keys.py.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import msgspec

from schemas.alerts import Alert
from schemas.api_keys import ApiKeyAction, DeclaredBy, Id, ServiceName
from schemas.events import UsageEvent
from schemas.notifications import Notification, NotificationDelete, NotificationRead
from schemas.stats import StatsRecord
from schemas.system import SystemSnapshot

MAX_FRAME_BYTES = 64 * 1024
MAX_NESTING = 32  # arrays/objects inside each other in one client frame



class Channel(StrEnum):
    """What a connection receives; all but `activity` are on after authentication."""

    STATS = "stats"
    ALERTS = "alerts"
    NOTIFICATIONS = "notifications"
    API_KEYS = "api_keys"
    ACTIVITY = "activity"


DEFAULT_CHANNELS = frozenset(
    {Channel.STATS, Channel.ALERTS, Channel.NOTIFICATIONS, Channel.API_KEYS}
)


class ErrorCode(StrEnum):
    INVALID_FRAME = "invalid_frame"  # not JSON, not an object, no `event`
    UNKNOWN_EVENT = "unknown_event"
    INVALID_DATA = "invalid_data"  # `data` breaks the event's schema
    NOT_AUTHENTICATED = "not_authenticated"
    FORBIDDEN = "forbidden"  # e.g. subscribe_monitoring without the admin role
    FORBIDDEN_USER = "forbidden_user"  # a user_id other than the token's
    SECRET_REFUSED = "secret_refused"  # a field looks like an API key secret
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # Kafka refused or its local queue is full


class ClientFrame(msgspec.Struct, frozen=True):
    """The envelope of every client frame; `data` is decoded per event.

    Decode it with `decode_client_frame`, the one decoder (it also bounds the nesting)."""

    event: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    data: msgspec.Raw = msgspec.Raw(b"{}")


class InvalidFrame(ValueError):
    """The text is not a client frame; `str(exc)` is fit to show the client."""


# -- client → server ------------------------------------------------------------------


class Authenticate(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    resume_from: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class Subscribe(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    channels: Annotated[list[Channel], msgspec.Meta(min_length=1, max_length=8)]


class MarkNotificationRead(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    notification_id: Id
    read: bool = True


class Empty(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`subscribe_monitoring` carries no data."""


class Ping(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    nonce: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class ApiKeyChange(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """`api_key_created|updated|deleted`: metadata only, never the secret."""

    api_key_id: Id
    service: ServiceName
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""


# `track_usage` data is a usage event (schemas.events), validated by `decode_event`.
CLIENT_EVENTS: dict[str, type[Any] | None] = {
    "authenticate": Authenticate,
    "subscribe": Subscribe,
    "unsubscribe": Subscribe,
    "track_usage": None,
    "mark_notification_read": MarkNotificationRead,
    "subscribe_monitoring": Empty,
    "api_key_created": ApiKeyChange,
    "api_key_updated": ApiKeyChange,
    "api_key_deleted": ApiKeyChange,
    "ping": Ping,
}


# -- server → client ------------------------------------------------------------------


class Authenticated(msgspec.Struct, kw_only=True, frozen=True):
    user_id: str
    roles: list[str]
    connection_id: str
    cursor: str  # resume from here if nothing else arrives
    expires_at: int  # epoch seconds: the token's exp; the socket closes 4401 then


class Subscribed(msgspec.Struct, kw_only=True, frozen=True):
    channels: list[Channel]


class Error(msgspec.Struct, kw_only=True, frozen=True):
    code: ErrorCode
    message: str
    event: str | None = None  # the client event that caused it, when known


class ApiKeyUpdate(msgspec.Struct, kw_only=True, frozen=True):
    """`api_key_update`: an `apikey.events` message without its `user_id`."""

    action: ApiKeyAction
    api_key_id: str
    service: str
    name: str
    at: datetime
    event_id: str = ""
    declared_by: DeclaredBy = DeclaredBy.CLIENT


class StatsUpdate(StatsRecord, kw_only=True, frozen=True):
    """`usage_stats_update` (DESIGN §9): a window's stats record, final or provisional.

    `final` true: the pipeline's record from `usage.stats`, exact, replacing any provisional
    one of the same (service, window_start). `final` false: the live tier's figures of a
    window still open, from the events this bridge has seen so far (docs/websocket.md, "Live
    tier"); they may differ from the final ones (events before the socket connected, late or
    duplicate events beyond its bounds). `as_of` is the newest event time counted and
    `deduplicated` false says some events could not be checked for duplicates.
    """

    final: bool = True
    as_of: datetime | None = None
    deduplicated: bool = True


class ResyncReason(StrEnum):
    """Why a resume could not be honoured (`resync_required.reason`)."""

    INVALID_CURSOR = "invalid_cursor"  # not a cursor this bridge wrote
    RESUME_UNAVAILABLE = "resume_unavailable"  # a bridge without Kafka
    PARTITIONS_CHANGED = "partitions_changed"  # the topics were repartitioned
    BEYOND_RETENTION = "beyond_retention"  # the log start passed the cursor
    CURSOR_AHEAD_OF_LOG = "cursor_ahead_of_log"
    TOO_FAR_BEHIND = "too_far_behind"  # more to replay or scan than the bounds allow
    REPLAY_TIMEOUT = "replay_timeout"
    REPLAY_FAILED = "replay_failed"


class ResyncRequired(msgspec.Struct, kw_only=True, frozen=True):
    reason: str  # a ResyncReason (a str, so that a newer bridge's reason still decodes)
    cursor: str  # a fresh cursor: live data continues from here


class Pong(msgspec.Struct, kw_only=True, frozen=True):
    nonce: str | None = None


SERVER_EVENTS: dict[str, type[Any]] = {
    "authenticated": Authenticated,
    "subscribed": Subscribed,
    "error": Error,
    "usage_stats_update": StatsUpdate,
    "usage_alert": Alert,
    "usage_event": UsageEvent,
    "new_notification": Notification,
    "notification_read": NotificationRead,
    "notification_deleted": NotificationDelete,
    "system_notification": Notification,
    "api_key_update": ApiKeyUpdate,
    "system_stats": SystemSnapshot,  # schemas/system.py, as GET /v1/admin/system
    "resync_required": ResyncRequired,
    "pong": Pong,
}
CURSOR_EVENTS = frozenset({"usage_alert", "new_notification", "notification_read",
                           "notification_deleted", "api_key_update"})


class ServerFrame(msgspec.Struct, frozen=True):
    """A server frame as a client decodes it (`data` decoded per event)."""

    event: str
    data: msgspec.Raw
    ts: int
    seq: Annotated[int, msgspec.Meta(ge=1)]
    cursor: str | None = None


# -- encoding helpers ---------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_frame_decoder = msgspec.json.Decoder(ServerFrame)
_data_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(kind) for name, kind in SERVER_EVENTS.items()
}


def frame_prefix(event: str, data: msgspec.Struct | msgspec.Raw, ts_ms: int) -> str:
    """Everything of a server frame but its per-connection tail (`"cursor":…,"seq":N}`).

    Encoded once per message and shared by every connection it goes to.
    """
    body = data if isinstance(data, msgspec.Raw) else msgspec.Raw(_encoder.encode(data))
    head = _encoder.encode({"event": event, "data": body, "ts": ts_ms})
    return head[:-1].decode() + ","


def decode_server_frame(text: str | bytes) -> tuple[ServerFrame, Any]:
    """A received server frame and its typed data (for clients and tests)."""
    frame = _frame_decoder.decode(text)
    decoder = _data_decoders.get(frame.event)
    if decoder is None:
        msg = f"unknown server event {frame.event!r}"
        raise msgspec.ValidationError(msg)
    return frame, decoder.decode(frame.data)


_client_frame_decoder = msgspec.json.Decoder(ClientFrame)
# a JSON string (skipped whole) or one bracket
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def decode_client_frame(text: str | bytes) -> ClientFrame:
    """The envelope of a client frame, or InvalidFrame: not JSON, not an object, no `event`,
    or nested deeper than MAX_NESTING (refused before anything is built, so the depth at
    which a frame fails never depends on the caller's stack)."""
    if _too_deep(text if isinstance(text, str) else text.decode("utf-8", "replace")):
        msg = f"bad frame: nested deeper than {MAX_NESTING} levels"
        raise InvalidFrame(msg)
    try:
        return _client_frame_decoder.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        msg = f"bad frame: {exc}"
        raise InvalidFrame(msg) from None


def _too_deep(text: str) -> bool:
    if text.count("[") + text.count("{") <= MAX_NESTING:  # every ordinary frame
        return False
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif char in "]}":
            depth -= 1
    return False


def client_frame(event: str, data: object | None = None) -> str:
    """A client frame as text (for clients, tests and the benchmark)."""
    return _encoder.encode({"event": event, "data": {} if data is None else data}).decode()


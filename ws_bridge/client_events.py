"""What a client may ask of an authenticated connection (DESIGN §7, client → server).

Every frame is decoded against its event's schema; anything wrong (deep nesting included)
earns an `error` frame with a code (schemas.ws.ErrorCode) and the connection carries on.
Handlers never await: producing to Kafka only queues the message in librdkafka.
Re-sending `authenticate` swaps the token: same user only, and the roles are the new
token's (monitoring stops when the admin role is gone).

`api_key_created|updated|deleted` are the user's own client declaring what it did: the
`apikey.events` message is marked `declared_by` "client" (the key-management backend's word
comes over HTTP, `POST /v1/api-keys/events`, marked "service"), and its notification is the
template registry's `api_key_<action>`, id `apikey:<event_id>`, `data.declared_by` "client".
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from core.auth import ADMIN_ROLE, AuthError, verify_token
from core.clock import Clock
from core.secrets import find_secret
from core.settings import Settings
from core.templates import Templates
from core.topics import APIKEY_EVENTS, NOTIFICATIONS, USAGE_EVENTS
from schemas.api_keys import ApiKeyAction, ApiKeyEvent, DeclaredBy, notification_id
from schemas.events import InvalidEvent, decode_event, encode_event
from schemas.notifications import NotificationRead
from schemas.ws import (
    ApiKeyChange,
    Authenticate,
    Error,
    ErrorCode,
    InvalidFrame,
    MarkNotificationRead,
    Ping,
    Pong,
    Subscribe,
    Subscribed,
    decode_client_frame,
    frame_prefix,
)
from ws_bridge.connection import CHANNEL_BITS, Connection
from ws_bridge.producer import Sink, Unavailable
from ws_bridge.registry import Registry
from ws_bridge.router import ORIGIN_HEADER, utc_now
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)

_any = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(kind)
    for kind in (Authenticate, Subscribe, MarkNotificationRead, Ping, ApiKeyChange)
}
_APIKEY_FIELDS = frozenset(ApiKeyChange.__struct_fields__)
_APIKEY_ACTIONS = {  # no `rotated`: only the key-management backend rotates a key
    "api_key_created": ApiKeyAction.CREATED,
    "api_key_updated": ApiKeyAction.UPDATED,
    "api_key_deleted": ApiKeyAction.DELETED,
}


class ClientError(Exception):
    """Answer the client with an `error` frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ClientEvents:
    def __init__(self, settings: Settings, registry: Registry, stats: BridgeStats,
                 sink: Sink | None, clock: Clock, *, templates: Templates,
                 reauthenticated: Callable[[Connection, float], str],
                 monitoring_frame: Callable[[], str]) -> None:
        self.settings = settings
        self.templates = templates
        self.registry = registry
        self.stats = stats
        self.sink = sink
        self.clock = clock
        self.reauthenticated = reauthenticated
        self.monitoring_frame = monitoring_frame
        self.events_topic = settings.topic(USAGE_EVENTS)
        self.notifications_topic = settings.topic(NOTIFICATIONS)
        self.apikey_topic = settings.topic(APIKEY_EVENTS)
        self.handlers: dict[str, Callable[[Connection, str, msgspec.Raw], None]] = {
            "authenticate": self._authenticate,
            "subscribe": self._subscribe,
            "unsubscribe": self._subscribe,
            "track_usage": self._track_usage,
            "mark_notification_read": self._mark_read,
            "subscribe_monitoring": self._monitoring,
            "api_key_created": self._api_key,
            "api_key_updated": self._api_key,
            "api_key_deleted": self._api_key,
            "ping": self._ping,
        }

    def handle(self, conn: Connection, text: str) -> None:
        """Handle one client frame; errors become `error` frames."""
        event: str | None = None
        try:
            try:
                frame = decode_client_frame(text)
            except InvalidFrame as exc:
                raise ClientError(ErrorCode.INVALID_FRAME, str(exc)) from None
            event = frame.event
            self._handler(event)(conn, event, frame.data)
        except ClientError as exc:
            self.error(conn, exc.code, exc.message, event)

    def _handler(self, event: str) -> Callable[[Connection, str, msgspec.Raw], None]:
        handler = self.handlers.get(event)
        if handler is None:
            raise ClientError(ErrorCode.UNKNOWN_EVENT, f"unknown event {event[:64]!r}")
        return handler

    def error(self, conn: Connection, code: ErrorCode, message: str, event: str | None) -> None:
        frame = Error(code=code, message=message[:512], event=event)
        conn.offer_control(frame_prefix("error", frame, self._ts()))

    def _ts(self) -> int:
        return int(self.clock() * 1000)

    def _produce(self, topic: str, key: bytes, value: bytes,
                 headers: list[tuple[str, bytes]] | None = None) -> None:
        if self.sink is None:
            raise ClientError(ErrorCode.UNAVAILABLE, "this bridge does not produce to Kafka")
        try:
            self.sink.produce(topic, key, value, headers)
        except Unavailable as exc:
            raise ClientError(ErrorCode.UNAVAILABLE, str(exc)) from None

    # -- handlers -------------------------------------------------------------------------

    def _authenticate(self, conn: Connection, _event: str, raw: msgspec.Raw) -> None:
        data: Authenticate = _decode(Authenticate, raw)
        try:
            principal = verify_token(self.settings, data.token, clock=self.clock)
        except AuthError as exc:
            raise ClientError(ErrorCode.NOT_AUTHENTICATED, str(exc)) from None
        if principal.user_id != conn.user_id:
            raise ClientError(ErrorCode.FORBIDDEN_USER, "a connection cannot change user")
        conn.roles = principal.roles
        if conn.monitoring and ADMIN_ROLE not in principal.roles:
            conn.monitoring = False
            self.registry.monitors.discard(conn)
        conn.offer_control(self.reauthenticated(conn, principal.expires_at))

    def _subscribe(self, conn: Connection, event: str, raw: msgspec.Raw) -> None:
        data: Subscribe = _decode(Subscribe, raw)
        bits = 0
        for channel in data.channels:
            bits |= CHANNEL_BITS[channel.value]
        channels = conn.channels | bits if event == "subscribe" else conn.channels & ~bits
        self.registry.set_channels(conn, channels)
        names = [name for name, bit in CHANNEL_BITS.items() if channels & bit]
        conn.offer_control(frame_prefix("subscribed", Subscribed(channels=names), self._ts()))  # type: ignore[arg-type]

    def _track_usage(self, conn: Connection, event: str, raw: msgspec.Raw) -> None:
        if not conn.usage_bucket.take():
            self.stats.rate_limited += 1
            raise ClientError(ErrorCode.RATE_LIMITED, "track_usage rate limit exceeded")
        fields = _fields(raw)
        user_id = fields.setdefault("user_id", conn.user_id)
        if user_id != conn.user_id:
            raise ClientError(ErrorCode.FORBIDDEN_USER, "user_id must be the authenticated user")
        try:
            usage = decode_event(_encoder.encode(fields))
        except InvalidEvent as exc:
            raise ClientError(ErrorCode.INVALID_DATA, exc.reason) from None
        self._produce(self.events_topic, conn.key, encode_event(usage))

    def _mark_read(self, conn: Connection, _event: str, raw: msgspec.Raw) -> None:
        data: MarkNotificationRead = _decode(MarkNotificationRead, raw)
        read = NotificationRead(notification_id=data.notification_id, user_id=conn.user_id,
                                read=data.read, at=utc_now(self.clock))
        self._produce(self.notifications_topic, conn.key, _encoder.encode(read),
                      [(ORIGIN_HEADER, conn.connection_id.encode())])

    def _monitoring(self, conn: Connection, _event: str, raw: msgspec.Raw) -> None:
        if ADMIN_ROLE not in conn.roles:
            raise ClientError(ErrorCode.FORBIDDEN, "subscribe_monitoring needs the admin role")
        fields = _fields(raw)
        if fields:
            raise ClientError(ErrorCode.INVALID_DATA, "subscribe_monitoring takes no data")
        conn.monitoring = True
        self.registry.monitors.add(conn)
        conn.offer_control(self.monitoring_frame())

    def _api_key(self, conn: Connection, event: str, raw: msgspec.Raw) -> None:
        fields = _fields(raw)
        problem = find_secret(fields, _APIKEY_FIELDS)
        if problem is not None:
            raise ClientError(ErrorCode.SECRET_REFUSED, problem)
        data: ApiKeyChange = _decode(ApiKeyChange, raw)
        action = _APIKEY_ACTIONS[event]
        now = utc_now(self.clock)
        event_id = str(uuid.uuid4())
        change = ApiKeyEvent(action=action, user_id=conn.user_id, api_key_id=data.api_key_id,
                             service=data.service, name=data.name, at=now, event_id=event_id,
                             declared_by=DeclaredBy.CLIENT)
        note = self.templates.notification(
            f"api_key_{action.value}", notification_id=notification_id(event_id),
            user_id=conn.user_id, created_at=now,
            fields={"api_key_id": data.api_key_id, "service": data.service,
                    "name": data.name or data.api_key_id,
                    "declared_by": DeclaredBy.CLIENT.value})
        self._produce(self.apikey_topic, conn.key, _encoder.encode(change))
        self._produce(self.notifications_topic, conn.key, _encoder.encode(note))

    def _ping(self, conn: Connection, _event: str, raw: msgspec.Raw) -> None:
        data: Ping = _decode(Ping, raw)
        conn.offer_control(frame_prefix("pong", Pong(nonce=data.nonce), self._ts()))


def _decode(kind: type[Any], raw: msgspec.Raw) -> Any:
    try:
        return _decoders[kind].decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise ClientError(ErrorCode.INVALID_DATA, f"data: {exc}") from None


def _fields(raw: msgspec.Raw) -> dict[str, Any]:
    """`data` as a JSON object of any fields (validated further by the handler)."""
    try:
        return _any.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise ClientError(ErrorCode.INVALID_DATA, f"data: {exc}") from None

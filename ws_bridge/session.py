"""One WebSocket from upgrade to close: origin check, authentication, resume, frame loop.

Nothing but `authenticated` (or a close) reaches a socket before its token is verified.
The token comes from an `Authorization: Bearer` header on the upgrade, or from the first
frame, `authenticate {token, resume_from?}`, within `auth_timeout` seconds; anything else
closes with 4401. Tokens in the query string are refused (they end up in access logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from core.auth import AuthError, Principal, verify_token
from core.clock import Clock
from core.settings import Settings
from schemas.ws import (
    MAX_FRAME_BYTES,
    Authenticate,
    Authenticated,
    ClientFrame,
    ErrorCode,
    ResyncRequired,
    frame_prefix,
)
from ws_bridge import cursor as cursors
from ws_bridge.client_events import ClientEvents
from ws_bridge.connection import (
    CLOSE_FORBIDDEN_ORIGIN,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    Connection,
)
from ws_bridge.limits import TokenBucket
from ws_bridge.registry import Registry
from ws_bridge.resume import Span, replay
from ws_bridge.router import Kind, Router
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)

_envelope = msgspec.json.Decoder(ClientFrame)
_authenticate = msgspec.json.Decoder(Authenticate)
_QUERY_SECRETS = frozenset({"token", "access_token", "jwt", "auth", "authorization"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits (seconds, frames, frames per second)."""

    auth_timeout: float = 5.0
    max_queue: int = 256
    rate: float = 20.0  # client frames per second, sustained
    burst: float = 40.0
    usage_rate: float = 10.0  # track_usage frames per second, sustained
    usage_burst: float = 20.0
    flood_close_after: int = 500  # consecutive rate-limited frames before closing 1008


class _AuthFailed(Exception):
    pass


class Sessions:
    """The `/ws` endpoint: `await sessions.serve(websocket)` serves one socket to its end."""

    def __init__(self, settings: Settings, registry: Registry, router: Router,
                 events: ClientEvents, *, stats: BridgeStats, clock: Clock, limits: Limits,
                 kafka: bool = True) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.events = events
        self.stats = stats
        self.clock = clock
        self.limits = limits
        self.kafka = kafka
        self.allowed_origins = frozenset(o.rstrip("/") for o in settings.ws_allowed_origins)
        self.resume_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ws-resume")

    def origin_allowed(self, websocket: WebSocket) -> bool:
        """No Origin (not a browser): allowed. Else it must be listed in
        `ws_allowed_origins` ("*" allows any) or, when that list is empty, be same-host."""
        origin = websocket.headers.get("origin")
        if origin is None:
            return True
        origin = origin.rstrip("/")
        if self.allowed_origins:
            return "*" in self.allowed_origins or origin in self.allowed_origins
        host = websocket.headers.get("host", "")
        return bool(host) and urlsplit(origin).netloc.lower() == host.lower()

    async def serve(self, websocket: WebSocket) -> None:
        if not self.origin_allowed(websocket):
            self.stats.rejected_origin += 1
            await websocket.close(CLOSE_FORBIDDEN_ORIGIN)  # before accept: HTTP 403
            return
        await websocket.accept()
        try:
            async with asyncio.timeout(self.limits.auth_timeout):
                principal, resume_from = await self._authenticate(websocket)
        except (TimeoutError, AuthError, _AuthFailed) as exc:
            self.stats.auth_failures += 1
            reason = "authentication timed out" if isinstance(exc, TimeoutError) else str(exc)
            await _close(websocket, CLOSE_UNAUTHORIZED, reason[:120])
            return
        except WebSocketDisconnect:
            return
        await self._serve(websocket, principal, resume_from)

    async def _authenticate(self, websocket: WebSocket) -> tuple[Principal, str | None]:
        query = websocket.scope.get("query_string", b"").decode("latin-1")
        if any(name.lower() in _QUERY_SECRETS for name, _ in parse_qsl(query)):
            msg = "tokens in the query string are refused; use the authenticate frame"
            raise _AuthFailed(msg)
        header = websocket.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                msg = "Authorization must be a Bearer token"
                raise _AuthFailed(msg)
            return verify_token(self.settings, token.strip(), clock=self.clock), None
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        text = message.get("text")
        if text is None or len(text) > MAX_FRAME_BYTES:
            msg = "expected an authenticate frame"
            raise _AuthFailed(msg)
        try:
            frame = _envelope.decode(text)
            if frame.event != "authenticate":
                msg = "the first frame must be authenticate"
                raise _AuthFailed(msg)
            data = _authenticate.decode(frame.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            msg = "expected an authenticate frame"
            raise _AuthFailed(msg) from None
        return verify_token(self.settings, data.token, clock=self.clock), data.resume_from

    async def _serve(self, websocket: WebSocket, principal: Principal,
                     resume_from: str | None) -> None:
        limits = self.limits
        conn = Connection(
            websocket, uuid.uuid4().hex[:16], principal.user_id, principal.roles,
            max_queue=limits.max_queue,
            bucket=TokenBucket(limits.rate, limits.burst, self.clock),
            usage_bucket=TokenBucket(limits.usage_rate, limits.usage_burst, self.clock),
            stats=self.stats,
        )
        if not self.registry.add(conn):
            self.stats.rejected_cap += 1
            await _close(websocket, CLOSE_TOO_MANY, "too many connections for this user")
            return
        self.stats.connections_opened += 1
        try:
            baseline = (conn.pos_a, conn.pos_n)
            start = self._resume_start(conn, resume_from)  # moves the floor: no await before
            first = self.authenticated(conn, principal.expires_at, start)
            conn.seq = 1
            await websocket.send_text(f'{first}"seq":1}}')
            if resume_from is not None:
                await self._resume(conn, start, baseline)
            conn.start()
            await self._receive_loop(conn)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            self.registry.remove(conn)
            if conn.expiry is not None:
                conn.expiry.cancel()
            conn.stop()

    def authenticated(self, conn: Connection, expires_at: float,
                      start: cursors.Cursor | str | None = None) -> str:
        """The `authenticated` frame head; (re)arms the close at token expiry."""
        if conn.expiry is not None:
            conn.expiry.cancel()
        delay = max(0.0, expires_at - self.clock())
        conn.expiry = asyncio.get_running_loop().call_later(
            delay, conn.close, CLOSE_UNAUTHORIZED, "token expired")
        text = start.encode() if isinstance(start, cursors.Cursor) else conn.cursor()
        data = Authenticated(user_id=conn.user_id, roles=list(conn.roles),
                             connection_id=conn.connection_id, cursor=text,
                             expires_at=int(expires_at))
        return frame_prefix("authenticated", data, int(self.clock() * 1000))

    def _resume_start(self, conn: Connection,
                      resume_from: str | None) -> cursors.Cursor | str | None:
        """The decoded cursor (the live floor raised to it), or why to resync."""
        if resume_from is None:
            return None
        try:
            start = cursors.decode(resume_from)
        except cursors.BadCursor:
            return "invalid_cursor"
        if not self.kafka:
            return "resume_unavailable"
        if (start.alerts_partition, start.notifications_partition) != (conn.part_a, conn.part_n):
            return "partitions_changed"
        conn.pos_a = max(conn.pos_a, start.alerts_offset)
        conn.pos_n = max(conn.pos_n, start.notifications_offset)
        return start

    async def _resume(self, conn: Connection, start: cursors.Cursor | str | None,
                      baseline: tuple[int, int]) -> None:
        reason: str | None = start if isinstance(start, str) else None
        if isinstance(start, cursors.Cursor):
            registry = self.registry
            spans = (
                Span(registry.alerts_topic, conn.part_a, start.alerts_offset, baseline[0],
                     Kind.ALERTS),
                Span(registry.notifications_topic, conn.part_n, start.notifications_offset,
                     baseline[1], Kind.NOTIFICATIONS),
            )
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(
                    self.resume_pool, replay, self.settings, self.router, conn.key, start, spans)
            except Exception:
                logger.exception("resume failed for connection %s", conn.connection_id)
                reason = "replay_failed"
            else:
                reason = result.resync
                conn.queue[0:0] = result.frames
        if reason is not None:
            self.stats.resyncs += 1
            conn.pos_a, conn.pos_n = max(baseline[0], 0), max(baseline[1], 0)
            frame = frame_prefix("resync_required",
                                 ResyncRequired(reason=reason, cursor=conn.cursor()),
                                 int(self.clock() * 1000))
            conn.queue.insert(0, frame)

    async def _receive_loop(self, conn: Connection) -> None:
        websocket = conn.websocket
        limits = self.limits
        handle = self.events.handle
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if conn.close_code is not None:
                continue  # closing: drain until the disconnect arrives
            text = message.get("text")
            if text is None:
                data = message.get("bytes") or b""
                if len(data) > MAX_FRAME_BYTES:
                    conn.close(CLOSE_TOO_BIG, "frame too big")
                    continue
                self.events.error(conn, ErrorCode.INVALID_FRAME, "frames must be text JSON", None)
                continue
            if len(text) > MAX_FRAME_BYTES // 4 and len(text.encode()) > MAX_FRAME_BYTES:
                conn.close(CLOSE_TOO_BIG, "frame too big")
                continue
            if not conn.bucket.take():
                self.stats.rate_limited += 1
                conn.flood += 1
                if conn.flood >= limits.flood_close_after:
                    conn.close(CLOSE_POLICY, "message rate limit exceeded")
                    continue
                now = self.clock()
                if now >= conn.error_budget_at:
                    conn.error_budget_at = now + 1.0
                    self.events.error(conn, ErrorCode.RATE_LIMITED,
                                      "message rate limit exceeded; frames are being dropped",
                                      None)
                continue
            conn.flood = 0
            handle(conn, text)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
        await asyncio.wait_for(websocket.close(code, reason), 2.0)

"""One WebSocket from upgrade to close: origin check, authentication, resume, frame loop.

Nothing but `authenticated` (or a close) reaches a socket before its token is verified.
The token comes from an `Authorization: Bearer` header on the upgrade, or from the first
frame, `authenticate {token, resume_from?}`, within `auth_timeout` seconds; anything else
closes with 4401. Tokens in the query string are refused (they end up in access logs).
At most `ws_max_pending` sockets wait for authentication at once: beyond, a new socket is
closed at once with 1013 (try again later).

A token's expiry closes the socket with 4401: a timer for idle sockets, and a check of the
injected clock before each client frame.

Resume is streamed: the replay's frames are written chunk by chunk ahead of the live
stream, which waits in the connection's queue (CONNECTING: unwritten) until
`Connection.start()`.

Every socket leaves three kinds of line on the logger `keypulse.ws.connections` (INFO,
key=value): `connect` (connection id, remote address, origin), `authenticate` (user, roles;
again on each re-authentication) and `close` (who closed, code, reason, duration, frames in
and out), refused sockets included. Never a token: the ids and counts are the bridge's own,
and what the client wrote (origin, its close reason) is quoted, cut to 120 characters, and
anything shaped like a JWT in it is replaced by `***`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from core.auth import AuthError, Principal, verify_token
from core.clock import Clock
from core.limits import TokenBucket
from core.settings import Settings
from schemas.ws import (
    MAX_FRAME_BYTES,
    Authenticate,
    Authenticated,
    ErrorCode,
    InvalidFrame,
    ResyncReason,
    ResyncRequired,
    decode_client_frame,
    frame_prefix,
)
from ws_bridge import cursor as cursors
from ws_bridge.client_events import ClientEvents
from ws_bridge.connection import (
    CLOSE_FORBIDDEN_ORIGIN,
    CLOSE_OVERFLOW,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    Connection,
)
from ws_bridge.registry import Registry
from ws_bridge.resume import Bounds, Replay, ReplayTimeout, replay_spans
from ws_bridge.router import Router
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)
connections = logging.getLogger("keypulse.ws.connections")  # one line per connect/auth/close

_authenticate = msgspec.json.Decoder(Authenticate)
_QUERY_SECRETS = frozenset({"token", "access_token", "jwt", "auth", "authorization"})

CLOSE_TRY_AGAIN = 1013  # too many sockets waiting to authenticate
REPLAY_CHUNK_BYTES = 512 * 1024  # a replay chunk: at most this, and the queue bound in frames
REPLAY_STALL_S = 30.0  # a replayed frame not taken within this closes 4008


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


_NEVER = float("inf")


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
        self.resume_bounds = Bounds.of(settings)
        self.pending = 0  # sockets accepted and not yet authenticated
        self.expires_at: dict[Connection, float] = {}  # token expiry per open connection

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
        trace = Trace(websocket)
        if not self.origin_allowed(websocket):
            self.stats.rejected_origin += 1
            await websocket.close(CLOSE_FORBIDDEN_ORIGIN)  # before accept: HTTP 403
            trace.closed("server", CLOSE_FORBIDDEN_ORIGIN, "origin not allowed")
            return
        if self.pending >= self.settings.ws_max_pending:
            self.stats.rejected_pending += 1
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await websocket.accept()  # so that the client sees why: a close code
            reason = "too many unauthenticated sockets; retry"
            await _close(websocket, CLOSE_TRY_AGAIN, reason)
            trace.closed("server", CLOSE_TRY_AGAIN, reason)
            return
        self.pending += 1
        try:
            await websocket.accept()
            async with asyncio.timeout(self.limits.auth_timeout):
                principal, resume_from = await self._authenticate(websocket, trace)
        except (TimeoutError, AuthError, _AuthFailed) as exc:
            self.stats.auth_failures += 1
            reason = "authentication timed out" if isinstance(exc, TimeoutError) else str(exc)
            await _close(websocket, CLOSE_UNAUTHORIZED, reason[:120])
            trace.closed("server", CLOSE_UNAUTHORIZED, reason[:120])
            return
        except WebSocketDisconnect as exc:
            trace.closed("client", exc.code, exc.reason or "")
            return
        except (RuntimeError, OSError) as exc:
            trace.closed("error", None, str(exc))
            return
        finally:
            self.pending -= 1
        await self._serve(websocket, principal, resume_from, trace)

    async def _authenticate(self, websocket: WebSocket, trace: Trace
                            ) -> tuple[Principal, str | None]:
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
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
        trace.frames_in += 1
        text = message.get("text")
        if text is None or len(text) > MAX_FRAME_BYTES:
            msg = "expected an authenticate frame"
            raise _AuthFailed(msg)
        try:
            frame = decode_client_frame(text)
            if frame.event != "authenticate":
                msg = "the first frame must be authenticate"
                raise _AuthFailed(msg)
            data = _authenticate.decode(frame.data)
        except (InvalidFrame, msgspec.ValidationError, msgspec.DecodeError):
            msg = "expected an authenticate frame"
            raise _AuthFailed(msg) from None
        return verify_token(self.settings, data.token, clock=self.clock), data.resume_from

    async def _serve(self, websocket: WebSocket, principal: Principal,
                     resume_from: str | None, trace: Trace) -> None:
        limits = self.limits
        conn = Connection(
            websocket, trace.connection_id, principal.user_id, principal.roles,
            max_queue=limits.max_queue,
            bucket=TokenBucket(limits.rate, limits.burst, self.clock),
            usage_bucket=TokenBucket(limits.usage_rate, limits.usage_burst, self.clock),
            stats=self.stats,
        )
        if not self.registry.add(conn):
            self.stats.rejected_cap += 1
            reason = "too many connections for this user"
            await _close(websocket, CLOSE_TOO_MANY, reason)
            trace.closed("server", CLOSE_TOO_MANY, reason, user=conn.user_id)
            return
        self.stats.connections_opened += 1
        try:
            baseline = conn.position()
            start = self._resume_start(conn, resume_from)  # moves the floor: no await before
            first = self.authenticated(conn, principal.expires_at, start)
            await conn.write_now(first)  # seq 1, ahead of anything queued live meanwhile
            if resume_from is not None:
                await self._resume(conn, start, baseline)
            conn.start()
            await self._receive_loop(conn, trace)
        except WebSocketDisconnect as exc:
            trace.peer_code, trace.peer_reason = exc.code, exc.reason or ""
        except (RuntimeError, OSError):
            pass
        finally:
            self.registry.remove(conn)
            self.expires_at.pop(conn, None)
            if conn.expiry is not None:
                conn.expiry.cancel()
            conn.stop()
            if conn.close_code is not None:  # the server closed it
                trace.closed("server", conn.close_code, conn.close_reason, user=conn.user_id,
                             frames_out=conn.seq)
            else:
                trace.closed("client", trace.peer_code, trace.peer_reason, user=conn.user_id,
                             frames_out=conn.seq)

    def authenticated(self, conn: Connection, expires_at: float,
                      start: cursors.Cursor | str | None = None) -> str:
        """The `authenticated` frame head; (re)arms the close at token expiry."""
        if connections.isEnabledFor(logging.INFO):
            connections.info("authenticate conn=%s user=%s roles=%s reauth=%d",
                             conn.connection_id, _quote(conn.user_id),
                             _quote(",".join(conn.roles)), conn.expiry is not None)
        if conn.expiry is not None:
            conn.expiry.cancel()
        self.expires_at[conn] = expires_at
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
            return ResyncReason.INVALID_CURSOR
        if not self.kafka:
            return ResyncReason.RESUME_UNAVAILABLE
        complete = conn.resume_from(start)
        return ResyncReason.PARTITIONS_CHANGED if complete is None else complete

    async def _resume(self, conn: Connection, start: cursors.Cursor | str | None,
                      baseline: cursors.Cursor) -> None:
        """Replay what the cursor missed, or queue `resync_required` ahead of the live frames
        (a replay that fails midway also ends with it: the client refetches from there)."""
        reason = await self._replay(conn, start, baseline) if isinstance(
            start, cursors.Cursor) else start
        if reason is not None and conn.close_code is None:
            self.stats.resyncs += 1
            conn.rewind(baseline)
            frame = frame_prefix("resync_required",
                                 ResyncRequired(reason=reason, cursor=conn.cursor()),
                                 int(self.clock() * 1000))
            conn.queue.insert(0, frame)

    async def _replay(self, conn: Connection, start: cursors.Cursor,
                      baseline: cursors.Cursor) -> str | None:
        """Stream the missed frames to the socket, one chunk read from Kafka at a time, each
        written (`Connection.write_now`) once the writer takes it, i.e. the peer reads: one
        chunk in memory, plus what the writer holds (one frame, or its buffer's high-water
        mark)."""
        spans = replay_spans(self.registry, start, baseline)
        replay = Replay(self.settings, self.router, conn.key, start, spans, self.resume_bounds)
        loop = asyncio.get_running_loop()
        try:
            reason = await loop.run_in_executor(self.resume_pool, replay.plan)
            while reason is None and conn.close_code is None and not replay.finished:
                frames = await loop.run_in_executor(
                    self.resume_pool, replay.next_chunk, conn.max_queue, REPLAY_CHUNK_BYTES)
                for prefix in frames:
                    try:  # past the live frames queued meanwhile, once the writer takes it
                        written = await asyncio.wait_for(conn.write_now(prefix),
                                                         REPLAY_STALL_S)
                    except TimeoutError:
                        self.stats.closed_overflow += 1
                        conn.close(CLOSE_OVERFLOW, "replay not taken: resume from your last cursor")
                        return None
                    if not written:  # closing: token expired, live queue overflowed
                        return None
        except ReplayTimeout:
            return ResyncReason.REPLAY_TIMEOUT
        except (WebSocketDisconnect, RuntimeError, OSError):
            raise
        except Exception:
            logger.exception("resume failed for connection %s", conn.connection_id)
            return ResyncReason.REPLAY_FAILED
        finally:
            self._close_later(replay)
        return reason

    def _close_later(self, replay: Replay) -> None:
        """Close the replay's consumer off the loop (after a chunk still being read)."""
        try:
            self.resume_pool.submit(replay.close)
        except RuntimeError:  # the pool is shut down: the bridge is stopping
            replay.close()

    async def _receive_loop(self, conn: Connection, trace: Trace) -> None:
        websocket = conn.websocket
        limits = self.limits
        handle = self.events.handle
        expires_at = self.expires_at
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                trace.peer_code = message.get("code", 1005)
                trace.peer_reason = message.get("reason") or ""
                return
            trace.frames_in += 1
            if conn.close_code is not None:
                continue  # closing: drain until the disconnect arrives
            if self.clock() >= expires_at.get(conn, _NEVER):
                conn.close(CLOSE_UNAUTHORIZED, "token expired")
                continue
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


# -- the connection log ----------------------------------------------------------------------

_JWT = re.compile(r"eyJ[\w-]*\.[\w-]*\.?[\w-]*")
_MAX_LOGGED = 120


def _quote(text: str | None) -> str:
    """A value for a key=value line: `-` when absent, else JSON-quoted (no line breaks),
    cut to 120 characters, anything shaped like a JWT replaced by `***`."""
    if text is None or text == "":
        return "-"
    return msgspec.json.encode(_JWT.sub("***", text)[:_MAX_LOGGED]).decode()


class Trace:
    """One socket's story for the connection log: its id (the `connection_id` the client is
    given), when it connected, client frames read, and how the peer closed."""

    __slots__ = ("connection_id", "frames_in", "peer_code", "peer_reason", "started")

    def __init__(self, websocket: WebSocket) -> None:
        self.connection_id = uuid.uuid4().hex[:16]
        self.started = time.monotonic()
        self.frames_in = 0
        self.peer_code: int | None = None
        self.peer_reason = ""
        if connections.isEnabledFor(logging.INFO):
            client = websocket.client
            remote = f"{client.host}:{client.port}" if client is not None else "-"
            connections.info("connect conn=%s remote=%s origin=%s", self.connection_id,
                             _quote(remote), _quote(websocket.headers.get("origin")))

    def closed(self, by: str, code: int | None, reason: str, *, user: str | None = None,
               frames_out: int = 0) -> None:
        if not connections.isEnabledFor(logging.INFO):
            return
        connections.info(
            "close conn=%s user=%s by=%s code=%s reason=%s duration_s=%.3f frames_in=%d "
            "frames_out=%d", self.connection_id, _quote(user), by,
            "-" if code is None else code, _quote(reason), time.monotonic() - self.started,
            self.frames_in, frames_out)

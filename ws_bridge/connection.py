"""One authenticated WebSocket: its bounded send queue and how it is written.

Routing never awaits: it offers a pre-encoded frame to `Connection.offer*`, which appends
to a small deque and writes it. Under uvicorn's sans-I/O websockets protocol (what the
bridge runs on) the frame is written straight to the transport, WebSocket header and all
(server frames are unmasked text frames: two or four header bytes), with no task, no ASGI
message and no await per frame; frames stay queued only while the transport is paused
(its buffer is over the high-water mark: the peer is not reading) and a small drain task
writes them when it resumes. Broadcasts are queued everywhere first and written by the
router's sliced fan-out (`flush`), so per-user frames never wait behind 10,000 writes:
a per-user frame flushes its connection at once, broadcast first, so order is kept.
Under any other ASGI server (tests' fake sockets) one sender task per connection drains
the queue with `websocket.send_text`. The queue is bounded (`max_queue` frames):

- stats updates are coalesced: the queue holds a `(service, window_start)` key and the
  latest frame for that key wins, so a slow client sees fewer, fresher updates;
- activity (`usage_event`) frames are dropped past half the bound;
- alerts, notifications, api-key and system frames are never dropped: past the bound the
  socket closes with 4008 and the client resumes from its last cursor;
- replies (errors, pongs) are dropped past the bound: the client is not reading anyway.

`seq` is assigned when a frame is written, so it has no gaps whatever was coalesced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ws_bridge import cursor
from ws_bridge.limits import TokenBucket
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
CLOSE_OVERFLOW = 4008
CLOSE_TOO_MANY = 4429
CLOSE_TOO_BIG = 1009
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
CLOSE_GRACE_S = 2.0

# Channel bits (schemas.ws.Channel): a connection's subscriptions are one small int.
STATS, ALERTS, NOTIFICATIONS, API_KEYS, ACTIVITY = 1, 2, 4, 8, 16
CHANNEL_BITS = {
    "stats": STATS,
    "alerts": ALERTS,
    "notifications": NOTIFICATIONS,
    "api_keys": API_KEYS,
    "activity": ACTIVITY,
}
DEFAULT_CHANNELS = STATS | ALERTS | NOTIFICATIONS | API_KEYS

# Cursor topics.
CURSOR_ALERTS, CURSOR_NOTIFICATIONS = 1, 2


class Connection:
    """State of one authenticated socket; kept small (10,000 of these per process)."""

    __slots__ = (
        "bucket",
        "channels",
        "close_code",
        "close_reason",
        "connection_id",
        "drainer",
        "error_budget_at",
        "expiry",
        "flood",
        "key",
        "max_queue",
        "monitoring",
        "part_a",
        "part_n",
        "pending_stats",
        "pos_a",
        "pos_n",
        "proto",
        "queue",
        "roles",
        "sender",
        "seq",
        "started",
        "stats",
        "usage_bucket",
        "user_id",
        "waiter",
        "websocket",
    )

    def __init__(
        self,
        websocket: WebSocket,
        connection_id: str,
        user_id: str,
        roles: tuple[str, ...],
        *,
        max_queue: int,
        bucket: TokenBucket,
        usage_bucket: TokenBucket,
        stats: BridgeStats,
    ) -> None:
        self.websocket = websocket
        self.connection_id = connection_id
        self.user_id = user_id
        self.key = user_id.encode()
        self.roles = roles
        self.channels = DEFAULT_CHANNELS
        self.monitoring = False
        self.seq = 0
        self.queue: list[Any] = []  # a list: 56 bytes empty, and it is almost always empty
        self.pending_stats: dict[tuple[str, int], str] | None = None
        self.max_queue = max_queue
        self.waiter: asyncio.Future[None] | None = None
        self.sender: asyncio.Task[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.bucket = bucket
        self.usage_bucket = usage_bucket
        self.flood = 0
        self.error_budget_at = 0.0
        self.stats = stats
        # resume position: next offset per cursor topic (set by the registry at add time)
        self.part_a = self.part_n = 0
        self.pos_a = self.pos_n = 0
        # fast path: uvicorn's sans-I/O protocol under this socket (None: sender task)
        self.proto: WebSocketsSansIOProtocol | None = find_protocol(websocket)
        self.started = False  # frames are only written once the session has started us
        self.drainer: asyncio.Task[None] | None = None

    # -- offers (never await, never raise) -----------------------------------------

    def offer_control(self, prefix: str) -> None:
        """A reply to this client (error, pong, subscribed): dropped if the queue is full."""
        if self.close_code is None and len(self.queue) < self.max_queue:
            self.queue.append(prefix)
            self._wake()

    def offer_must(self, prefix: str) -> None:
        """A frame that must arrive (alert, notification, api-key, system): 4008 on overflow."""
        if self.close_code is not None:
            return
        if len(self.queue) >= self.max_queue:
            self.stats.closed_overflow += 1
            self.close(CLOSE_OVERFLOW, "send queue overflow: resume from your last cursor")
            return
        self.queue.append(prefix)
        self._wake()

    def offer_cursor(self, prefix: str, topic: int, offset: int) -> None:
        """An alert or notification: skipped if before this connection's position, else
        delivered with the cursor just past it."""
        if topic == CURSOR_ALERTS:
            if offset < self.pos_a:
                return
            self.pos_a = offset + 1
        else:
            if offset < self.pos_n:
                return
            self.pos_n = offset + 1
        self.offer_must(f'{prefix}"cursor":"{self.cursor()}",')

    def offer_cursor_skip(self, topic: int, offset: int) -> None:
        """Move past a message this connection must not get (its own read-state echo)."""
        if topic == CURSOR_ALERTS:
            self.pos_a = max(self.pos_a, offset + 1)
        else:
            self.pos_n = max(self.pos_n, offset + 1)

    def offer_stats(self, prefix: str, key: tuple[str, int]) -> None:
        """A stats update: replaces a queued update of the same (service, window)."""
        if self.close_code is not None:
            return
        pending = self.pending_stats
        if pending is None:
            pending = self.pending_stats = {}
        elif key in pending:
            pending[key] = prefix
            self.stats.stats_coalesced += 1
            return
        if len(self.queue) >= self.max_queue:
            self.stats.stats_dropped += 1
            return
        pending[key] = prefix
        self.queue.append(key)
        self._wake()

    def offer_broadcast(self, prefix: str) -> bool:
        """A frame for every connection (offer_must's policy), queued but not written on the
        fast path: True if the caller must `flush` this connection (its sliced fan-out)."""
        if self.close_code is not None:
            return False
        if len(self.queue) >= self.max_queue:
            self.stats.closed_overflow += 1
            self.close(CLOSE_OVERFLOW, "send queue overflow: resume from your last cursor")
            return False
        self.queue.append(prefix)
        if self.proto is None:
            self._wake()
            return False
        return self.started

    def offer_droppable(self, prefix: str) -> None:
        """An activity frame: dropped once the queue is half full."""
        if self.close_code is None and len(self.queue) < self.max_queue // 2:
            self.queue.append(prefix)
            self._wake()
        else:
            self.stats.activity_dropped += 1

    def cursor(self) -> str:
        return cursor.encode(self.part_a, self.pos_a, self.part_n, self.pos_n)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """The session sent `authenticated` (and queued any replay): start writing."""
        self.started = True
        loop = asyncio.get_running_loop()
        if self.proto is None:
            self.sender = loop.create_task(self.run_sender())
        elif self.close_code is not None:
            self.sender = loop.create_task(self._close_now())
        else:
            self.flush()

    def stop(self) -> None:
        """The session ended: cancel what still runs for this connection."""
        for task in (self.sender, self.drainer):
            if task is not None and not task.done():
                task.cancel()
        self.queue.clear()
        self.pending_stats = None

    def close(self, code: int, reason: str = "") -> None:
        """Close the socket with `code` (a close frame, then the TCP connection if the peer
        does not take it within 2 s); queued frames are discarded."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self.queue.clear()
        self.pending_stats = None
        if self.proto is None:
            self._wake()
        elif self.started:
            if self.drainer is not None:
                self.drainer.cancel()
            self.sender = asyncio.get_running_loop().create_task(self._close_now())

    def _wake(self) -> None:
        if self.proto is not None:
            if self.started:
                self.flush()
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def flush(self) -> None:
        """Fast path: write every queued frame to the transport now, in one write."""
        queue = self.queue
        proto = self.proto
        if not queue or proto is None or self.close_code is not None:
            return
        transport = proto.transport
        if proto.close_sent or proto.disconnected or transport.is_closing():
            queue.clear()  # going away: the receive loop gets the disconnect
            self.pending_stats = None
            return
        if not proto.writable.is_set():  # paused: the peer is behind
            if self.drainer is None:
                self.drainer = asyncio.get_running_loop().create_task(self._drain(proto))
            return
        if len(queue) == 1 and queue[0].__class__ is str:  # the common case: one frame
            seq = self.seq = self.seq + 1
            data = f'{queue.pop()}"seq":{seq}}}'.encode()
            self.stats.frames_out += 1
            transport.write(_header(len(data)) + data)
            return
        parts: list[bytes] = []
        seq = self.seq
        items = queue.copy()
        queue.clear()
        for item in items:
            prefix = item
            if item.__class__ is tuple:
                pending = self.pending_stats
                if pending is None:
                    continue
                prefix = pending.pop(item)
            seq += 1
            data = f'{prefix}"seq":{seq}}}'.encode()
            parts.append(_header(len(data)))
            parts.append(data)
        self.stats.frames_out += seq - self.seq
        self.seq = seq
        transport.write(b"".join(parts))

    async def _drain(self, proto: WebSocketsSansIOProtocol) -> None:
        try:
            await proto.writable.wait()
        finally:
            self.drainer = None
        self.flush()

    async def run_sender(self) -> None:
        """Write queued frames in order, stamping `seq`; close when asked."""
        queue = self.queue
        send = self.websocket.send_text
        loop = asyncio.get_running_loop()
        try:
            while self.close_code is None:
                if not queue:
                    self.waiter = loop.create_future()
                    try:
                        await self.waiter
                    finally:
                        self.waiter = None
                    continue
                item = queue.pop(0)  # at most max_queue items
                if item.__class__ is tuple:
                    pending = self.pending_stats
                    if pending is None:
                        continue
                    item = pending.pop(item)
                self.seq += 1
                await send(f'{item}"seq":{self.seq}}}')
                self.stats.frames_out += 1
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        await self._close_now()

    async def _close_now(self) -> None:
        code = self.close_code or CLOSE_GOING_AWAY
        try:
            await asyncio.wait_for(self.websocket.close(code, self.close_reason), CLOSE_GRACE_S)
        except TimeoutError:
            logger.info("connection %s did not take its close frame; aborting", self.connection_id)
            if self.proto is not None:
                self.proto.transport.abort()
            else:
                abort_transport(self.websocket)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass


_SMALL_HEADERS = [bytes((0x81, size)) for size in range(126)]


def _header(size: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of `size` bytes (RFC 6455 5.2)."""
    if size < 126:
        return _SMALL_HEADERS[size]
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big")
    return b"\x81\x7f" + size.to_bytes(8, "big")


def find_protocol(websocket: WebSocket) -> WebSocketsSansIOProtocol | None:
    """uvicorn's sans-I/O protocol object behind `websocket`'s ASGI send callable (the
    bound method itself, or inside closures of middleware that wrap it), if that is what
    serves it."""
    seen: set[int] = set()
    stack: list[Any] = [getattr(websocket, "_send", None)]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or len(seen) > 32:
            continue
        seen.add(id(obj))
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, WebSocketsSansIOProtocol):
            return owner
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                if callable(cell.cell_contents):
                    stack.append(cell.cell_contents)
    return None


def abort_transport(websocket: WebSocket) -> None:
    """Drop the TCP connection now, buffered data or not (a peer that stopped reading).

    ASGI has no abort; uvicorn's protocol objects hold the transport, so look for it behind
    the receive/send callables (bound methods, or closures of middleware around them).
    """
    seen: set[int] = set()
    stack: list[Any] = [websocket._receive, websocket._send]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or len(seen) > 32:
            continue
        seen.add(id(obj))
        owner = getattr(obj, "__self__", None)
        transport = getattr(owner, "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()
            return
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                if callable(cell.cell_contents):
                    stack.append(cell.cell_contents)
    logger.warning("could not abort a stuck WebSocket: no transport found")

"""One authenticated WebSocket's send queue: what is kept, dropped or coalesced, and when.

Routing never awaits: it offers a pre-encoded frame to `Connection.offer*`, which queues it
and, once the connection is open, hands it at once to the socket's `FrameWriter`
(`ws_bridge.transport`: uvicorn's transport written directly, or plain ASGI sends). Frames
stay queued only while the writer is paused (the peer is behind) and are handed over when
it resumes. Broadcasts are queued everywhere first and handed over by the router's sliced
fan-out (`flush`), so per-user frames never wait behind 10,000 writes: a per-user frame
flushes its connection at once, broadcast first, so order is kept. The queue is bounded
(`max_queue` frames):

- stats updates are coalesced: the queue holds a `(service, window_start)` key and the
  latest frame for that key wins, so a slow client sees fewer, fresher updates;
- activity (`usage_event`) frames are dropped past half the bound;
- alerts, notifications, api-key and system frames are never dropped: past the bound the
  socket closes with 4008 and the client resumes from its last cursor (alerts,
  notifications and api-key updates carry one: `offer_cursor`);
- replies (errors, pongs) are dropped past the bound: the client is not reading anyway.

`seq` is assigned when a frame is handed to the writer, so it has no gaps whatever was
coalesced. A connection goes CONNECTING → OPEN → CLOSING → CLOSED (`State`); nothing here
knows which server it runs on.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from starlette.websockets import WebSocket

from core.limits import TokenBucket
from ws_bridge import cursor
from ws_bridge.cursor import Cursor
from ws_bridge.stats import BridgeStats
from ws_bridge.transport import FrameWriter, writer_for

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
CLOSE_OVERFLOW = 4008
CLOSE_TOO_MANY = 4429
CLOSE_TOO_BIG = 1009
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001

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

# Cursor topics: the topics whose frames carry a resume cursor (ws_bridge.cursor).
CURSOR_ALERTS, CURSOR_NOTIFICATIONS, CURSOR_API_KEYS = 1, 2, 3


class State(enum.IntEnum):
    """Where a connection is; offers are taken before CLOSING, written only when OPEN."""

    CONNECTING = 0  # registered, `authenticated` and any replay being sent: frames queue up
    OPEN = 1  # start(): queued frames go to the writer as offered, while it takes them
    CLOSING = 2  # close(): the queue is discarded and the close frame is on its way
    CLOSED = 3  # stop(): the session ended


_CONNECTING, _OPEN, _CLOSING, _CLOSED = State


class Connection:
    """State of one authenticated socket; kept small (10,000 of these per process)."""

    __slots__ = (
        "bucket",
        "channels",
        "close_code",
        "close_reason",
        "connection_id",
        "error_budget_at",
        "expiry",
        "flood",
        "key",
        "max_queue",
        "monitoring",
        "part_a",
        "part_k",
        "part_n",
        "pending_stats",
        "pos_a",
        "pos_k",
        "pos_n",
        "queue",
        "roles",
        "seq",
        "state",
        "stats",
        "usage_bucket",
        "user_id",
        "waiter",
        "websocket",
        "writer",
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
        writer: FrameWriter | None = None,
    ) -> None:
        self.websocket = websocket
        self.writer = writer if writer is not None else writer_for(websocket)
        self.state = _CONNECTING
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
        self.waiter: asyncio.Future[None] | None = None  # wait_writable
        self.expiry: asyncio.TimerHandle | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.bucket = bucket
        self.usage_bucket = usage_bucket
        self.flood = 0
        self.error_budget_at = 0.0
        self.stats = stats
        # resume position: next offset per cursor topic (set by the registry at add time)
        self.part_a = self.part_n = self.part_k = 0
        self.pos_a = self.pos_n = self.pos_k = 0

    # -- offers (never await, never raise) -----------------------------------------

    def offer_control(self, prefix: str) -> None:
        """A reply to this client (error, pong, subscribed): dropped if the queue is full."""
        if self.state < _CLOSING and len(self.queue) < self.max_queue:
            self.queue.append(prefix)
            if self.state is _OPEN:
                self.flush()

    def offer_must(self, prefix: str) -> None:
        """A frame that must arrive (alert, notification, api-key, system): 4008 on overflow."""
        if self.state >= _CLOSING:
            return
        if len(self.queue) >= self.max_queue:
            self.stats.closed_overflow += 1
            self.close(CLOSE_OVERFLOW, "send queue overflow: resume from your last cursor")
            return
        self.queue.append(prefix)
        if self.state is _OPEN:
            self.flush()

    def offer_cursor(self, prefix: str, topic: int, offset: int) -> None:
        """An alert, notification or API-key update: skipped if before this connection's
        position, else delivered with the cursor just past it."""
        if topic == CURSOR_ALERTS:
            if offset < self.pos_a:
                return
            self.pos_a = offset + 1
        elif topic == CURSOR_NOTIFICATIONS:
            if offset < self.pos_n:
                return
            self.pos_n = offset + 1
        else:
            if offset < self.pos_k:
                return
            self.pos_k = offset + 1
        self.offer_must(f'{prefix}"cursor":"{self.cursor()}",')

    def offer_cursor_skip(self, topic: int, offset: int) -> None:
        """Move past a message this connection must not get (its own read-state echo)."""
        if topic == CURSOR_ALERTS:
            self.pos_a = max(self.pos_a, offset + 1)
        elif topic == CURSOR_NOTIFICATIONS:
            self.pos_n = max(self.pos_n, offset + 1)
        else:
            self.pos_k = max(self.pos_k, offset + 1)

    def offer_stats(self, prefix: str, key: tuple[str, int], *, flush: bool = True) -> None:
        """A stats update: replaces a queued update of the same (service, window).
        `flush=False` only queues it: the caller offers a few, then calls `flush()` once
        (one socket write for all of them)."""
        if self.state >= _CLOSING:
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
        if flush and self.state is _OPEN:
            self.flush()

    def write_stats(self, prefixes: list[str]) -> bool:
        """Stats updates written at once, in one write, when nothing is queued ahead and the
        writer takes them all (the live tier's path, 10,000 times a second: no coalescing
        to do, so no queue); False, and nothing done, otherwise: offer them."""
        if self.queue or self.state is not _OPEN:
            return False
        writer = self.writer
        if not writer.batches or writer.paused:
            return False
        self._write_all(prefixes)
        return True

    def offer_broadcast(self, prefix: str) -> bool:
        """A frame for every connection (offer_must's policy), queued but not written:
        True if the caller must `flush` this connection (its sliced fan-out)."""
        if self.state >= _CLOSING:
            return False
        if len(self.queue) >= self.max_queue:
            self.stats.closed_overflow += 1
            self.close(CLOSE_OVERFLOW, "send queue overflow: resume from your last cursor")
            return False
        self.queue.append(prefix)
        return self.state is _OPEN

    def offer_droppable(self, prefix: str) -> None:
        """An activity frame: dropped once the queue is half full."""
        if self.state < _CLOSING and len(self.queue) < self.max_queue // 2:
            self.queue.append(prefix)
            if self.state is _OPEN:
                self.flush()
        else:
            self.stats.activity_dropped += 1

    def cursor(self) -> str:
        return cursor.encode(self.part_a, self.pos_a, self.part_n, self.pos_n, self.part_k,
                             self.pos_k)

    # -- resume position (the session's) ---------------------------------------------

    def position(self) -> Cursor:
        """Where the live stream stands now (after registering: the resume baseline)."""
        return Cursor(self.part_a, self.pos_a, self.part_n, self.pos_n, self.part_k,
                             self.pos_k)

    def resume_from(self, start: Cursor) -> Cursor | None:
        """Raise the live floor to `start` and return it, complete (a version-1 cursor
        takes API-key updates from the current position: it never promised them); None if
        its partitions are not this connection's (the topics were repartitioned)."""
        if not start.has_api_keys:
            start = Cursor(start.alerts_partition, start.alerts_offset,
                                  start.notifications_partition, start.notifications_offset,
                                  self.part_k, self.pos_k)
        if start.partitions() != (self.part_a, self.part_n, self.part_k):
            return None
        self.pos_a = max(self.pos_a, start.alerts_offset)
        self.pos_n = max(self.pos_n, start.notifications_offset)
        self.pos_k = max(self.pos_k, start.api_keys_offset)
        return start

    def rewind(self, baseline: Cursor) -> None:
        """Back to `baseline` (a resume that failed: the client resyncs from there)."""
        self.pos_a = max(baseline.alerts_offset, 0)
        self.pos_n = max(baseline.notifications_offset, 0)
        self.pos_k = max(baseline.api_keys_offset, 0)

    # -- writing --------------------------------------------------------------------

    def flush(self) -> None:
        """Hand queued frames to the writer, stamping `seq`, while it takes them; the rest
        waits for its resume."""
        queue = self.queue
        if not queue or self.state is not _OPEN:
            return
        writer = self.writer
        if writer.paused:
            writer.on_resume(self._resumed)
            return
        if len(queue) == 1 and queue[0].__class__ is str:  # the common case: one frame
            seq = self.seq = self.seq + 1
            self.stats.frames_out += 1
            writer.write(f'{queue.pop()}"seq":{seq}}}')
            return
        if writer.batches:  # all of them, in one write
            prefixes = [prefix for prefix in map(self._prefix, queue) if prefix is not None]
            queue.clear()
            self._write_all(prefixes)
            return
        seq = start = self.seq
        writable = True  # one at a time, while the writer takes them
        while queue and writable:
            prefix = self._prefix(queue.pop(0))
            if prefix is not None:
                seq += 1
                writable = writer.write(f'{prefix}"seq":{seq}}}')
        if queue:
            writer.on_resume(self._resumed)
        self.seq = seq
        self.stats.frames_out += seq - start

    def _write_all(self, prefixes: list[str]) -> None:
        """Stamp `seq` on each frame and hand them all to a batching writer in one write."""
        seq = start = self.seq
        texts: list[str] = []
        for prefix in prefixes:
            seq += 1
            texts.append(f'{prefix}"seq":{seq}}}')
        self.seq = seq
        self.stats.frames_out += seq - start
        self.writer.writelines(texts)

    def _prefix(self, item: Any) -> str | None:
        """A queued frame's text: itself, or the latest update for a coalesced stats key."""
        if item.__class__ is tuple:
            pending = self.pending_stats
            return None if pending is None else pending.pop(item)
        return item  # type: ignore[no-any-return]

    def _resumed(self) -> None:
        self.flush()
        waiter = self.waiter
        if waiter is not None and not waiter.done() and self._writable():
            waiter.set_result(None)

    def _writable(self) -> bool:
        """A frame offered now would go straight to the writer (before start(): queued
        frames are held back and do not count)."""
        return not self.writer.paused and (self.state is not _OPEN or not self.queue)

    async def wait_writable(self) -> None:
        """Return once a frame offered now goes straight to the writer: the writer is not
        paused and, once open, nothing is queued ahead (`write_now` and a resume stream of
        `offer_must` use it to stay within the connection's bound). Returns at once if the
        connection is closing or closed: check `close_code`/`state`."""
        while self.state < _CLOSING and not self._writable():
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            self.writer.on_resume(self._resumed)
            try:
                await waiter
            finally:
                self.waiter = None

    async def write_now(self, prefix: str) -> bool:
        """Write one frame straight to the writer, past the queue, once it is writable.

        Before `start()` this puts it ahead of every live frame queued meanwhile (a resume
        replay streamed frame by frame, one writer's worth in memory at a time); after,
        it waits for the queue to drain. False if the connection or its socket is closing
        or closed (the caller can stop: nothing more will be written).
        """
        await self.wait_writable()
        if self.state >= _CLOSING or self.writer.closed:
            return False
        seq = self.seq = self.seq + 1
        self.stats.frames_out += 1
        self.writer.write(f'{prefix}"seq":{seq}}}')
        return True

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """The session sent `authenticated` (and any replay): write what is queued, and
        every frame from now on as it is offered."""
        if self.state is _CONNECTING:
            self.state = _OPEN
            self.flush()
        elif self.state is _CLOSING:  # closed while connecting: the close frame goes now
            self.writer.close(self.close_code or CLOSE_GOING_AWAY, self.close_reason)

    def close(self, code: int, reason: str = "") -> None:
        """Close the socket with `code` (a close frame, then the TCP connection if the peer
        does not take it within 2 s); queued frames are discarded. While connecting, the
        close frame waits for `start()` (the session may be mid-send)."""
        if self.state >= _CLOSING:
            return
        opened = self.state is _OPEN
        self.state = _CLOSING
        self.close_code = code
        self.close_reason = reason
        self.queue.clear()
        self.pending_stats = None
        if opened:
            self.writer.close(code, reason)
        self._wake_waiter()

    def stop(self) -> None:
        """The session ended: release the queue and what the writer still holds."""
        self.state = _CLOSED
        self.queue.clear()
        self.pending_stats = None
        self.writer.stop()
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run_sender(self) -> None:
        """`start()`, then return once everything queued is with the writer (for tests that
        drive a connection over a fake socket)."""
        self.start()
        await self.wait_writable()

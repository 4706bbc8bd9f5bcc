"""Everything the bridge knows about uvicorn's internals: its sans-I/O protocol, made lighter
per socket and given a direct frame writer.

`SlimWebSocketProtocol` is uvicorn's `websockets-sansio` protocol with

- lighter per-connection state: its inbox (an `asyncio.Queue`: four deques) and its
  `writable` event (an `asyncio.Event`: one more deque) replaced by single-consumer
  equivalents, and the handshake's request and response dropped once the socket is
  accepted (~5 KB less per socket; at 10,000 sockets per process every object counts);
- a `FrameWriter` announced in the ASGI scope (`ws_bridge.transport`), which writes each
  frame straight to the transport: an unmasked text frame header (RFC 6455 §5.2: server
  frames are never masked, two or four header bytes for our sizes) and the UTF-8 text, one
  `transport.write`, no task, no ASGI message and no await. It is paused while the
  transport is (its buffer is over the high-water mark: the peer is not reading) and calls
  back from `resume_writing`. Closing goes through the protocol's own ASGI `send`, so
  uvicorn's closing handshake and state stay its own; a peer that does not take the close
  frame within `CLOSE_GRACE_S` has its transport aborted.

Both lean on private details of uvicorn (`transport`, `writable`, `queue`, `close_sent`,
`disconnected`, `request`/`response`, the scope built in `handle_connect`), so they are used
only on the uvicorn versions they were tested on (`TESTED`); `server_protocol()` gives
uvicorn's stock protocol elsewhere, and every socket then takes the plain-ASGI writer.
`tests/ws/test_uvicorn_version.py` pins the range and checks that a real server selects
this writer. Nothing else in the bridge imports uvicorn. These writes bypass any middleware
that wraps `send`: mount the bridge where none rewrites WebSocket messages.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from ws_bridge.transport import CLOSE_GRACE_S, FRAME_WRITER_EXTENSION

logger = logging.getLogger(__name__)

# uvicorn versions the fast path was tested on, [low, high): tests/ws passed on 0.52.1, 0.53.0
# and 0.54.0 (websockets_sansio_impl is the same on all three but for one header line).
# Before 0.52.1 the sans-I/O protocol had no pause_writing/resume_writing (no back-pressure
# at all) and no `disconnected`.
TESTED = ((0, 52, 1), (0, 55, 0))


def release(text: str) -> tuple[int, ...]:
    """`0.54.0` → (0, 54, 0); a suffix is ignored (`0.55.0rc1` → (0, 55, 0))."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part or 0) for part in match.groups()) if match else (0, 0, 0)


def supported(uvicorn_version: str | None = None) -> bool:
    """Whether this uvicorn (the installed one by default) is in the tested range."""
    low, high = TESTED
    return low <= release(uvicorn_version or version("uvicorn")) < high


def server_protocol() -> type[WebSocketsSansIOProtocol] | str:
    """uvicorn's `ws` option: the slim protocol with the fast writer on a tested uvicorn,
    else uvicorn's stock sans-I/O protocol (plain-ASGI writes)."""
    if supported():
        return SlimWebSocketProtocol
    logger.warning("uvicorn %s is outside the range the bridge's fast path was tested on "
                   "(%s); frames go through plain ASGI sends", version("uvicorn"), TESTED)
    return "websockets-sansio"


class _Inbox:
    """`asyncio.Queue`'s put_nowait/get/empty for one consumer (the ASGI app's receive)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.pop(0)


class _Flag:
    """`asyncio.Event`'s is_set/set/clear/wait without a deque per instance."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


class SlimWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O protocol, lighter per socket, with a direct frame writer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # websockets logs the head and tail of every frame when its logger (uvicorn.error)
        # is at DEBUG: a token's signature, whatever a client sent. Never.
        self.conn.debug = False
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self.frame_writer: UvicornFrameWriter | None = None

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if not self.close_sent:  # upgraded: the scope exists, the app has not run yet
            self.frame_writer = UvicornFrameWriter(self)
            extensions: dict[str, Any] = self.scope["extensions"]  # type: ignore[assignment]
            extensions[FRAME_WRITER_EXTENSION] = self.frame_writer

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # only handle_connect and the accept above read these
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.frame_writer is not None:
            self.frame_writer.resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.frame_writer is not None:
            self.frame_writer.resumed()  # writes are dropped from now: let the queue go


class UvicornFrameWriter:
    """The fast `FrameWriter` of one `SlimWebSocketProtocol` socket (see the module)."""

    __slots__ = ("closer", "flag", "proto", "resume")

    def __init__(self, proto: SlimWebSocketProtocol) -> None:
        self.proto = proto
        self.flag: _Flag = proto.writable  # type: ignore[assignment]
        self.resume: Callable[[], object] | None = None
        self.closer: asyncio.Task[None] | None = None

    batches = True

    @property
    def paused(self) -> bool:
        return not self.flag._set

    @property
    def closed(self) -> bool:
        proto = self.proto
        return proto.close_sent or proto.disconnected or proto.transport.is_closing()

    def write(self, text: str) -> bool:
        proto = self.proto
        transport = proto.transport
        if proto.close_sent or proto.disconnected or transport.is_closing():
            return True  # going away: dropped; the receive loop gets the disconnect
        data = text.encode()
        transport.write(_header(len(data)) + data)
        return self.flag._set

    def writelines(self, texts: list[str]) -> bool:
        """Several frames in one `transport.write` (it may go past the high-water mark:
        by at most a queue's worth)."""
        proto = self.proto
        transport = proto.transport
        if proto.close_sent or proto.disconnected or transport.is_closing():
            return True
        parts: list[bytes] = []
        for text in texts:
            data = text.encode()
            parts.append(_header(len(data)))
            parts.append(data)
        transport.write(b"".join(parts))
        return self.flag._set

    def on_resume(self, callback: Callable[[], object]) -> None:
        if self.flag._set:
            self.proto.loop.call_soon(callback)
        else:
            self.resume = callback

    def resumed(self) -> None:
        """The protocol's transport resumed (or was lost): call back, outside its callback."""
        callback = self.resume
        if callback is not None:
            self.resume = None
            self.proto.loop.call_soon(callback)

    def close(self, code: int, reason: str) -> None:
        if self.closer is None:
            self.closer = self.proto.loop.create_task(self._close(code, reason))

    def stop(self) -> None:
        self.resume = None  # a pending close finishes on its own: the disconnect unblocks it

    async def _close(self, code: int, reason: str) -> None:
        proto = self.proto
        message: Any = {"type": "websocket.close", "code": code, "reason": reason}
        try:
            await asyncio.wait_for(proto.send(message), CLOSE_GRACE_S)
        except TimeoutError:
            logger.info("a WebSocket did not take its close frame within %ss; aborting",
                        CLOSE_GRACE_S)
            proto.transport.abort()
        except (RuntimeError, OSError):  # already closed or gone (ClientDisconnected)
            pass


_SMALL_HEADERS = [bytes((0x81, size)) for size in range(126)]


def _header(size: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of `size` bytes (RFC 6455 §5.2)."""
    if size < 126:
        return _SMALL_HEADERS[size]
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big")
    return b"\x81\x7f" + size.to_bytes(8, "big")

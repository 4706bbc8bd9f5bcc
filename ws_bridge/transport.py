"""How a connection's frames reach its socket: the `FrameWriter` seam and its plain-ASGI writer.

`Connection` (the queue policy) hands each stamped frame to a `FrameWriter` and stops when
the writer says it is paused; the writer calls back when it takes frames again. Two writers:

- a server's own writer, announced in the ASGI scope under
  `scope["extensions"][FRAME_WRITER_EXTENSION]`. `ws_bridge.uvicorn_fast` announces one that
  writes each frame straight to uvicorn's transport: no task, no ASGI message and no await
  per frame, paused while the transport's buffer is over its high-water mark;
- `AsgiWriter`, the fallback for any ASGI server (another server, another uvicorn version or
  protocol, tests' fake sockets): one sender task per connection awaiting
  `websocket.send_text`, one frame in flight at a time, paused while it is in flight.

`writer_for(websocket)` picks the announced writer, else the fallback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect

logger = logging.getLogger(__name__)

FRAME_WRITER_EXTENSION = "keypulse.frame_writer"
CLOSE_GRACE_S = 2.0  # a peer that does not take its close frame within this is dropped


class FrameWriter(Protocol):
    """Writes one socket's text frames, in order, with back-pressure.

    `write` never awaits and never raises; once the socket is going away it drops frames
    (the session learns of the disconnect from its receive loop).
    """

    @property
    def paused(self) -> bool:
        """True while the socket takes no more frames (the peer is behind)."""
        ...

    @property
    def closed(self) -> bool:
        """True once the socket is closing or gone: frames are dropped from then on."""
        ...

    @property
    def batches(self) -> bool:
        """True if `writelines` takes any number of frames at once; else frames are handed
        over one `write` at a time, until it returns False."""
        ...

    def write(self, text: str) -> bool:
        """Write one frame; False if the writer is now paused (wait for `on_resume`)."""
        ...

    def writelines(self, texts: list[str]) -> bool:
        """Write several frames at once (only if `batches`); False if now paused."""
        ...

    def on_resume(self, callback: Callable[[], object]) -> None:
        """Call `callback` once when the writer is no longer paused (soon, if it is not)."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Send a close frame after what was written; drop the connection if the peer does
        not take it within `CLOSE_GRACE_S` (where the server lets us). Idempotent."""
        ...

    def stop(self) -> None:
        """The session ended: release what the writer still holds."""
        ...


def writer_for(websocket: WebSocket) -> FrameWriter:
    """The writer the server announced for this socket, else the plain-ASGI fallback."""
    scope: dict[str, Any] | None = getattr(websocket, "scope", None)
    extensions = scope.get("extensions") if scope is not None else None
    writer: FrameWriter | None = (extensions or {}).get(FRAME_WRITER_EXTENSION)
    if writer is not None:
        return writer
    return AsgiWriter(websocket)


class AsgiWriter:
    """The fallback writer: `websocket.send_text` from one sender task, one frame at a time.

    Slower than a server's own writer (a task switch and an ASGI message per frame), but it
    needs nothing beyond ASGI. With one frame in flight, frames wait in the connection's
    queue, where its bound, coalescing and drop rules still apply. ASGI cannot abort a
    connection: a peer that takes no close frame within `CLOSE_GRACE_S` is left to the
    server's own timeouts (the sender gives up).
    """

    __slots__ = ("closing", "gave_up", "pending", "resume", "task", "waiter", "websocket")

    batches = False

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.pending: str | None = None  # the frame in flight
        self.resume: Callable[[], object] | None = None
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closing: tuple[int, str] | None = None
        self.gave_up: asyncio.TimerHandle | None = None

    @property
    def paused(self) -> bool:
        return self.pending is not None

    @property
    def closed(self) -> bool:
        task = self.task
        return self.closing is not None or (task is not None and task.done())

    def writelines(self, texts: list[str]) -> bool:
        msg = "AsgiWriter takes one frame at a time"
        raise NotImplementedError(msg)

    def write(self, text: str) -> bool:
        if self.closed:
            return True  # dropped
        self.pending = text
        self._wake()
        return False

    def on_resume(self, callback: Callable[[], object]) -> None:
        if self.pending is None:
            asyncio.get_running_loop().call_soon(callback)
        else:
            self.resume = callback

    def close(self, code: int, reason: str) -> None:
        if self.closing is not None:
            return
        self.closing = (code, reason)
        self.gave_up = asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._give_up)
        self._wake()

    def stop(self) -> None:
        self.resume = None
        if self.gave_up is not None:
            self.gave_up.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _wake(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _give_up(self) -> None:
        if self.task is not None and not self.task.done():
            logger.info("a WebSocket did not take its close frame within %ss; left to the "
                        "server's timeouts", CLOSE_GRACE_S)
            self.task.cancel()

    async def _run(self) -> None:
        websocket = self.websocket
        loop = asyncio.get_running_loop()
        try:
            while True:
                text = self.pending
                if text is not None and self.closing is None:
                    await websocket.send_text(text)
                    self.pending = None
                    callback = self.resume
                    if callback is not None:
                        self.resume = None
                        callback()  # the connection writes its next frame (sets pending)
                    continue
                if self.closing is not None:
                    break
                self.waiter = loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
            self.pending = None
            code, reason = self.closing
            await websocket.close(code, reason)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            self.pending = None
            if self.gave_up is not None:
                self.gave_up.cancel()

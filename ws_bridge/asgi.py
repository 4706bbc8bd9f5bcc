"""What `keypulse ws` serves: a bare ASGI app and a slimmer uvicorn WebSocket protocol.

At 10,000 connections per process every object kept per socket counts (the budget is
40 MB per 1,000 connections, Python objects included):

- `BridgeApp` routes `/ws` straight to the bridge's sessions, with lifespan; no
  FastAPI/Starlette middleware stack, whose coroutine frames (error middleware, exception
  handlers, exit stack, router) would stay suspended under every open socket (~8 KB each).
  `keypulse run` mounts `bridge.router` in the API's FastAPI app instead.
- `SlimWebSocketProtocol` is uvicorn's sans-I/O websockets protocol with its inbox (an
  `asyncio.Queue`: four deques) and its `writable` event (an `asyncio.Event`: one more
  deque) replaced by single-consumer equivalents, and the handshake's request and
  response objects dropped once the socket is accepted (~5 KB less per socket).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

if TYPE_CHECKING:
    from ws_bridge.app import Bridge

logger = logging.getLogger(__name__)


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
    """uvicorn's sans-I/O protocol with lighter per-connection state (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # only handle_connect and the accept above read these
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]


class BridgeApp:
    """The bridge alone as a bare ASGI app: lifespan, `path` (WebSocket), 404 otherwise."""

    def __init__(self, bridge: Bridge, path: str) -> None:
        self.bridge = bridge
        self.path = path

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "websocket":
            if scope["path"] == self.path:
                await self.bridge.sessions.serve(WebSocket(scope, receive, send))
            else:
                await send({"type": "websocket.close", "code": 1000})  # HTTP 403
        elif kind == "http":
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", b"9")]})
            await send({"type": "http.response.body", "body": b"not found"})
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.bridge.start()
                except Exception as exc:
                    logger.exception("websocket bridge failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.bridge.stop()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

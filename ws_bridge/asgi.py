"""What `keypulse ws` serves: the bridge as a bare ASGI app (any ASGI server).

At 10,000 connections per process every object kept per socket counts (the budget is
40 MB per 1,000 connections, Python objects included): `BridgeApp` routes `/ws` straight
to the bridge's sessions, with lifespan; no FastAPI/Starlette middleware stack, whose
coroutine frames (error middleware, exception handlers, exit stack, router) would stay
suspended under every open socket (~8 KB each). `keypulse run` mounts `bridge.router` in
the API's FastAPI app instead. The uvicorn protocol it is served with lives in
`ws_bridge.uvicorn_fast`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket

if TYPE_CHECKING:
    from ws_bridge.app import Bridge

logger = logging.getLogger(__name__)


class BridgeApp:
    """The bridge alone as a bare ASGI app: lifespan, `path` (WebSocket), plain HTTP to
    `Bridge.serve_http` (`/healthz`, `/readyz`, `/metrics`; 404 otherwise)."""

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
            await self.bridge.serve_http(scope, receive, send)  # /healthz /readyz /metrics
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

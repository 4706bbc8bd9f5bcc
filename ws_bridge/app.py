"""Assemble the bridge: `create_bridge(settings)` → a `Bridge` to run alone or mount.

    bridge = create_bridge(settings)
    app = FastAPI(lifespan=...)            # or bridge.app() for the bridge alone
    app.include_router(bridge.router)      # adds the /ws route
    await bridge.start() ... await bridge.stop()   # in the app's lifespan

Serve it with `uvicorn.Config(app, **UVICORN_WS_OPTIONS)`: the sans-I/O websockets
protocol (the lightest per connection; on a tested uvicorn the bridge's slim subclass with
direct frame writes, see ws_bridge.uvicorn_fast), 64 KiB frame limit (larger frames close
1009), no permessage-deflate, and 20 s pings with a 20 s pong deadline (dead peers gone in
40 s). Any other ASGI server works too, with plain ASGI sends (ws_bridge.transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import APIRouter
from starlette.routing import WebSocketRoute

from core import metrics
from core.clock import Clock, system_clock
from core.settings import Settings
from core.topics import NOTIFICATIONS, USAGE_ALERTS
from schemas.ws import MAX_FRAME_BYTES
from ws_bridge.asgi import BridgeApp
from ws_bridge.client_events import ClientEvents
from ws_bridge.connection import CLOSE_GOING_AWAY, Connection
from ws_bridge.kafka_feed import KafkaFeed
from ws_bridge.monitoring import Monitor
from ws_bridge.producer import BridgeProducer, Sink
from ws_bridge.registry import Registry
from ws_bridge.router import Router
from ws_bridge.session import Limits, Sessions
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)


def _ws_protocol() -> Any:
    """uvicorn's `ws` option: the slim sans-I/O protocol with direct frame writes on a
    uvicorn it was tested on, else uvicorn's own (frames then go through plain ASGI)."""
    try:
        from ws_bridge import uvicorn_fast
    except ImportError:  # a uvicorn without the sans-I/O protocol
        logger.warning("uvicorn has no sans-I/O websockets protocol; frames go through "
                       "plain ASGI sends")
        return "auto"
    return uvicorn_fast.server_protocol()


UVICORN_WS_OPTIONS: dict[str, Any] = {
    "ws": _ws_protocol(),
    "ws_max_size": MAX_FRAME_BYTES,
    "ws_per_message_deflate": False,
    "ws_ping_interval": 20.0,
    "ws_ping_timeout": 20.0,
}


class Feed(Protocol):
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def stop(self) -> None: ...


class Bridge:
    """The WebSocket bridge: its route, its Kafka threads, its counters."""

    def __init__(self, settings: Settings, *, path: str = "/ws", clock: Clock = system_clock,
                 limits: Limits | None = None, kafka: bool = True, sink: Sink | None = None,
                 monitor_interval: float = 5.0) -> None:
        self.settings = settings
        self.clock = clock
        self.limits = limits or Limits()
        self.kafka = kafka
        self.stats = BridgeStats()
        self.registry = Registry(
            max_per_user=settings.ws_max_connections_per_user,
            alerts_topic=settings.topic(USAGE_ALERTS),
            notifications_topic=settings.topic(NOTIFICATIONS),
        )
        self.fanout = Router(settings, self.registry, self.stats, clock)
        self.monitor = Monitor(self.registry, self.stats, clock, interval=monitor_interval)
        self.producer: BridgeProducer | None = None
        self.feed: Feed | None = None
        self.sink: Sink | None = sink  # kafka=False: where client events go (tests)
        if kafka:
            self.producer = BridgeProducer(settings, self.stats)
            self.sink = self.producer
            self.feed = KafkaFeed(settings, self.registry, self.fanout, self.stats)
        self.events = ClientEvents(
            settings, self.registry, self.stats, self.sink, clock,
            reauthenticated=self._reauthenticated, monitoring_frame=self.monitor.frame,
        )
        self.sessions = Sessions(settings, self.registry, self.fanout, self.events,
                                 stats=self.stats, clock=clock, limits=self.limits, kafka=kafka)
        self.router = APIRouter(tags=["websocket"])
        self.router.routes.append(WebSocketRoute(path, self.sessions.serve, name="ws"))
        self.path = path
        self._started = False

    def _reauthenticated(self, conn: Connection, expires_at: float) -> str:
        return self.sessions.authenticated(conn, expires_at)

    async def start(self) -> None:
        """Start the Kafka consumer and producer threads and the monitor (idempotent)."""
        if self._started:
            return
        loop = asyncio.get_running_loop()
        if self.producer is not None:
            self.producer.start()
        if self.feed is not None:
            await loop.run_in_executor(None, self.feed.start, loop)
        self.monitor.start()
        metrics.register("ws", self.metrics)
        self._started = True
        logger.info("websocket bridge started")

    def metrics(self) -> dict[str, int]:
        """Counters for `/metrics` and system stats: connections and the bridge's totals."""
        return {**self.stats.snapshot(), "connections": self.registry.total,
                "connected_users": self.registry.users()}

    async def stop(self) -> None:
        """Close every socket (1001), then stop the Kafka threads."""
        metrics.unregister("ws")
        if not self._started:
            return
        self._started = False
        for conn in list(self.registry):
            conn.close(CLOSE_GOING_AWAY, "server shutting down")
        await asyncio.sleep(0)
        await self.monitor.stop()
        loop = asyncio.get_running_loop()
        if self.feed is not None:
            await loop.run_in_executor(None, self.feed.stop)
        if self.producer is not None:
            await loop.run_in_executor(None, self.producer.stop)
        self.sessions.resume_pool.shutdown(wait=False, cancel_futures=True)
        logger.info("websocket bridge stopped")

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def app(self) -> BridgeApp:
        """A bare ASGI app serving only this bridge (what `keypulse ws` runs): no
        middleware stack under each socket (see ws_bridge.asgi). To serve the bridge
        beside other routes, include `router` in your own app instead."""
        return BridgeApp(self, self.path)


def create_bridge(settings: Settings, **options: Any) -> Bridge:
    """The bridge for `settings`; see `Bridge` for the options (path, clock, limits, kafka).

    Refuses (ConfigError) a missing or placeholder JWT secret outside dev mode.
    """
    settings.jwt_key  # noqa: B018 - raises before a socket is ever accepted
    return Bridge(settings, **options)

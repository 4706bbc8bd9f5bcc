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
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from fastapi import APIRouter
from prometheus_client.metrics_core import Metric
from starlette.routing import WebSocketRoute

from core import metrics, templates
from core.clock import Clock, system_clock
from core.settings import Settings
from core.telemetry import Endpoints, Telemetry, families
from core.topics import APIKEY_EVENTS, NOTIFICATIONS, USAGE_ALERTS
from schemas.ws import MAX_FRAME_BYTES
from ws_bridge.asgi import BridgeApp
from ws_bridge.client_events import ClientEvents
from ws_bridge.connection import CLOSE_GOING_AWAY, Connection
from ws_bridge.kafka_feed import KafkaFeed
from ws_bridge.live import LIVE_DESCRIBED, LiveTier
from ws_bridge.monitoring import Monitor
from ws_bridge.producer import BridgeProducer, Sink
from ws_bridge.registry import Registry
from ws_bridge.router import Router
from ws_bridge.session import Limits, Sessions
from ws_bridge.stats import BridgeStats, exposition

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
                 monitor_interval: float = 5.0, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        # the process's registry and readiness checks (keypulse ws makes it); served alone,
        # the bridge answers /healthz, /readyz and /metrics from it (`serve_http`)
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.endpoints = Endpoints(self.telemetry)
        self.clock = clock
        self.limits = limits or Limits()
        self.kafka = kafka
        self.stats = BridgeStats()
        self.registry = Registry(
            max_per_user=settings.ws_max_connections_per_user,
            alerts_topic=settings.topic(USAGE_ALERTS),
            notifications_topic=settings.topic(NOTIFICATIONS),
            apikeys_topic=settings.topic(APIKEY_EVENTS),
        )
        self.fanout = Router(settings, self.registry, self.stats, clock)
        self.live = LiveTier(settings, self.registry, clock)  # DESIGN §9, fed by the feed
        self.monitor = Monitor(settings, self.registry, clock, self.telemetry.system,
                               interval=monitor_interval)
        self.producer: BridgeProducer | None = None
        self.feed: Feed | None = None
        self.sink: Sink | None = sink  # kafka=False: where client events go (tests)
        if kafka:
            self.producer = BridgeProducer(settings, self.stats)
            self.sink = self.producer
            self.feed = KafkaFeed(settings, self.registry, self.fanout, self.stats,
                                  live=self.live)
        self.templates = templates.load(settings.notification_templates_file)  # checked now
        self.events = ClientEvents(
            settings, self.registry, self.stats, self.sink, clock, templates=self.templates,
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
        self.live.start(loop)
        metrics.register("ws", self.metrics, self.exposition)
        self._started = True
        logger.info("websocket bridge started")

    def metrics(self) -> dict[str, int]:
        """Counters for `/metrics` and system stats: connections and the bridge's totals."""
        return {**self.stats.snapshot(), **self.live.counters(),
                "connections": self.registry.total,
                "connected_users": self.registry.users()}

    def exposition(self) -> Iterator[Metric]:
        """The Prometheus families of `metrics()` and the delivery histogram, read now."""
        values = self.metrics()
        live = self.live.counters()
        yield from exposition({k: v for k, v in values.items() if k not in live}, self.stats)
        yield from families("ws", live, LIVE_DESCRIBED)

    async def serve_http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Plain HTTP when the bridge is served alone: `/healthz`, `/readyz`, `/metrics`
        (core.telemetry.Endpoints; the last two off the event loop: a probe or a scrape
        must not hold up 10,000 sockets), 404 otherwise."""
        path = scope["path"]
        accept = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                       if k == b"accept"), None)
        method = scope.get("method", "GET")
        if path in ("/readyz", "/metrics"):
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(None, self.endpoints.answer, path, accept,
                                                method)
        else:
            answer = self.endpoints.answer(path, accept, method)
        status, content_type, body = answer or (404, "text/plain; charset=utf-8",
                                                b"not found")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body",
                    "body": b"" if method == "HEAD" else body})

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
        self.live.stop()
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

    Refuses (ConfigError) a missing or placeholder JWT secret outside dev mode, and an
    invalid notification template file (`KEYPULSE_NOTIFICATION_TEMPLATES_FILE`).
    """
    settings.jwt_verify_keys  # noqa: B018 - raises before a socket is ever accepted
    return Bridge(settings, **options)

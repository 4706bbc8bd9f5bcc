"""`create_app`: the HTTP API, optionally with other parts' routers, lifespans and health
checks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, FastAPI

from api import errors, openapi
from api.responses import MsgspecResponse
from api.routes import (
    admin,
    alert_rules,
    alerts,
    announcements,
    api_keys,
    clickhouse,
    dev,
    events,
    health,
    notifications,
    usage,
    usage_events,
    web,
)
from core import __version__, templates
from core.clock import Clock, system_clock
from core.settings import Settings
from core.telemetry import HttpLatency, Telemetry

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]
HealthCheck = Callable[[], str | None]  # why the process is not healthy, or None

DESCRIPTION = """Real-time usage analytics for managed API keys (DESIGN §8).

**Auth**: `Authorization: Bearer <JWT>` (`keypulse token --role ...`), the WebSocket's tokens.
Roles: `user` (own data only: the user comes from the token's `sub`, never from a parameter),
`admin`, `ingest`, `service`, `analyst` (read-only SQL on `/clickhouse/`).

**Errors**: `{"error": {"code", "message", "field"?}}` with the status that says why; `429` and
`503` carry `Retry-After`. Bad input never answers a 5xx.

**Conventions**: times are RFC 3339 or epoch milliseconds, ranges are `[from, to)`; lists answer
`{"items": [...], "next_cursor": ...}`; analytics answers use the stats record's field names."""
TAGS = [
    {"name": "events", "description": "ingest usage events (to Kafka, confirmed)"},
    {"name": "usage", "description": "a user's analytics: summary, time series, breakdowns, "
                                     "raw events, exports"},
    {"name": "sql", "description": "read-only SQL for analysts (ClickHouse's HTTP interface)"},
    {"name": "alert rules", "description": "a user's alert rules, defaults included"},
    {"name": "alerts", "description": "a user's alert history"},
    {"name": "notifications", "description": "a user's notifications and their read state"},
    {"name": "api keys", "description": "API-key lifecycle events (role `service`)"},
    {"name": "admin", "description": "administration (role `admin`)"},
    {"name": "dev", "description": "dev mode only: the dashboard's demo sign-in"},
    {"name": "health", "description": "liveness and Prometheus metrics"},
]


def create_app(settings: Settings, *, routers: Sequence[APIRouter] = (),
               lifespans: Sequence[Lifespan] = (), health_checks: Sequence[HealthCheck] = (),
               clock: Clock = system_clock, telemetry: Telemetry | None = None) -> FastAPI:
    """The API app; `routers`, `lifespans` and `health_checks` let `keypulse run` add the
    bridge and the pipeline beside it. Refuses (ConfigError) a missing or placeholder JWT
    secret outside dev mode, before anything is served."""
    settings.jwt_verify_keys  # noqa: B018 - raises before a request is ever answered
    process = telemetry or Telemetry()  # /readyz, /metrics, the system snapshots

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # the process's snapshots measure our store, for a bridge beside us too
            stack.enter_context(admin.store_registered(settings, process.system))
            for part in lifespans:
                await stack.enter_async_context(part(app))
            yield

    app = FastAPI(title="keypulse", version=__version__, lifespan=lifespan,
                  default_response_class=MsgspecResponse, description=DESCRIPTION,
                  servers=[{"url": "/", "description": "the keypulse serving this document"}],
                  openapi_tags=TAGS)
    app.state.settings = settings
    app.state.clock = clock
    app.state.health_checks = tuple(health_checks)
    app.state.telemetry = process
    app.add_middleware(HttpLatency, telemetry=process)  # core.telemetry
    app.state.templates = templates.load(settings.notification_templates_file)  # checked now
    errors.install(app)
    openapi.install(app, security_schemes=clickhouse.SECURITY_SCHEMES)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(events.router)
    app.include_router(clickhouse.router)
    app.include_router(usage.router)
    app.include_router(usage_events.router)
    app.include_router(alert_rules.router)
    app.include_router(alerts.router)
    app.include_router(notifications.router)
    app.include_router(announcements.router)
    app.include_router(api_keys.router)
    app.include_router(dev.router)
    app.include_router(web.router)  # `/` and `/web/*` only (docs/dashboard.md)
    for router in routers:
        app.include_router(router)
    return app

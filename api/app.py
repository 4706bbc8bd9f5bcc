"""`create_app`: the HTTP API, optionally with other parts' routers, lifespans and health
checks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, FastAPI

from api import errors
from api.responses import MsgspecResponse
from api.routes import admin, clickhouse, events, health, system
from core import __version__
from core.clock import Clock, system_clock
from core.settings import Settings

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]
HealthCheck = Callable[[], str | None]  # why the process is not healthy, or None


def create_app(settings: Settings, *, routers: Sequence[APIRouter] = (),
               lifespans: Sequence[Lifespan] = (), health_checks: Sequence[HealthCheck] = (),
               clock: Clock = system_clock) -> FastAPI:
    """The API app; `routers`, `lifespans` and `health_checks` let `keypulse run` add the
    bridge and the pipeline beside it. Refuses (ConfigError) a missing or placeholder JWT
    secret outside dev mode, before anything is served."""
    settings.jwt_key  # noqa: B018 - raises before a request is ever answered

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for part in lifespans:
                await stack.enter_async_context(part(app))
            yield

    app = FastAPI(title="keypulse", version=__version__, lifespan=lifespan,
                  default_response_class=MsgspecResponse)
    app.state.settings = settings
    app.state.clock = clock
    app.state.health_checks = tuple(health_checks)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(system.router)
    app.include_router(admin.router)
    app.include_router(events.router)
    app.include_router(clickhouse.router)
    for router in routers:
        app.include_router(router)
    return app

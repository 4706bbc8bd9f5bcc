"""`create_app`: the HTTP API, optionally with other parts' routers and lifespans."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, FastAPI

from api.routes import health, system
from core import __version__
from core.settings import Settings

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]


def create_app(settings: Settings, *, routers: Sequence[APIRouter] = (),
               lifespans: Sequence[Lifespan] = ()) -> FastAPI:
    """The API app; `routers` and `lifespans` let `keypulse run` add the bridge beside it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for part in lifespans:
                await stack.enter_async_context(part(app))
            yield

    app = FastAPI(title="keypulse", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(system.router)
    for router in routers:
        app.include_router(router)
    return app

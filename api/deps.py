"""Dependency aliases for route functions.

    SettingsDep       the app's settings
    ClickHouseDep     the process's shared ClickHouse client (core.clickhouse.shared_client)
    CurrentUserDep    the principal of the request's `Authorization: Bearer` JWT, verified
                      with the WebSocket's rules (core.auth); 401 without a valid one
    require_role(r)   a dependency: the current user, 403 unless they hold one of the roles

    AdminDep = Annotated[Principal, Depends(require_role("admin"))]
    OwnerDep          the caller whose own rows a user route reads (user or admin), else 403
    PublisherDep      the app's Kafka producer (api.ingest.EventProducer), made on first use:
                      `send(messages, topic)` returns once Kafka confirmed
    TemplatesDep      the notification template registry (core.templates), checked at start

Routes that query ClickHouse are plain `def` (the client blocks; FastAPI runs them in its
thread pool).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from clickhouse_connect.driver.client import Client
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import APIError
from api.ingest import EventProducer
from core.auth import ADMIN_ROLE, USER_ROLE, AuthError, Principal, verify_token
from core.clickhouse import shared_client
from core.clock import Clock
from core.settings import Settings
from core.templates import Templates

BEARER = {"WWW-Authenticate": "Bearer"}
_bearer = HTTPBearer(auto_error=False, description="a keypulse JWT (`keypulse token`)")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_publisher(request: Request) -> EventProducer:
    state = request.app.state
    producer: EventProducer | None = getattr(state, "event_producer", None)
    if producer is None:
        producer = state.event_producer = EventProducer(state.settings)
    return producer


PublisherDep = Annotated[EventProducer, Depends(get_publisher)]


def get_templates(request: Request) -> Templates:
    templates: Templates = request.app.state.templates  # loaded and checked by create_app
    return templates


TemplatesDep = Annotated[Templates, Depends(get_templates)]


def get_clickhouse(settings: SettingsDep) -> Client:
    return shared_client(settings)


ClickHouseDep = Annotated[Client, Depends(get_clickhouse)]


def current_user(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise APIError(401, "unauthorized", "missing bearer token", headers=BEARER)
    clock: Clock = request.app.state.clock
    try:
        return verify_token(settings, credentials.credentials, clock=clock)
    except AuthError as exc:
        raise APIError(401, "unauthorized", str(exc), headers=BEARER) from None


CurrentUserDep = Annotated[Principal, Depends(current_user)]


def require_role(*roles: str) -> Callable[[Principal], Principal]:
    """A dependency returning the current user when they hold one of `roles`, else 403."""
    wanted = frozenset(roles)

    def check(user: CurrentUserDep) -> Principal:
        if wanted.isdisjoint(user.roles):
            names = " or ".join(sorted(wanted))
            raise APIError(403, "forbidden", f"this needs the {names} role")
        return user

    return check


AdminDep = Annotated[Principal, Depends(require_role(ADMIN_ROLE))]


def data_owner(user: CurrentUserDep) -> Principal:
    """The caller, when their token may read their own data (`user`, `admin`, or no roles,
    which acts as `user`), else 403. Whose rows a request reads comes from here, the token's
    `sub`, never from a parameter (DESIGN §8)."""
    if not {USER_ROLE, ADMIN_ROLE}.intersection(user.roles or (USER_ROLE,)):
        raise APIError(403, "forbidden", "this needs the user or admin role")
    return user


OwnerDep = Annotated[Principal, Depends(data_owner)]

"""Development sign-in for the dashboard (docs/dashboard.md): tokens on request, dev mode only.

`POST /v1/dev/token {user_id, role}` mints a short-lived token (DEV_TOKEN_TTL_SECONDS) with
the configured secret, and `GET /v1/dev/users` lists the busiest users of the last hour (the
ones `keypulse gen` made up: its seed picks new ids each run), so the page offers them.

Both answer 404 unless `settings.dev` is true: in dev mode the JWT secret is public anyway
(anyone can mint with `keypulse token`) and the server binds to loopback only
(keypulse.server.check_bind); outside it the routes do not exist for a caller. Even in dev
mode a browser page of another origin is refused (403): a site the developer visits must not
mint tokens from their local keypulse.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from clickhouse_connect.driver.exceptions import OperationalError
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from api.analytics import QUERY_SETTINGS
from api.deps import ClickHouseDep, SettingsDep
from api.errors import APIError
from api.responses import MsgspecResponse, described, failures
from core.auth import AuthError, mint_token
from core.clock import Clock
from core.errors import ServiceError

DEV_TOKEN_TTL_SECONDS = 8 * 3600  # a working day; the page signs in again after it
USERS_LOOKBACK_MS = 3_600_000
_ANONYMOUS: dict[str, Any] = {"security": [{}]}  # no token: this is where one comes from


class TokenRequest(BaseModel):
    """Who the token speaks for."""

    user_id: str = Field(min_length=1, max_length=128, description="the token's `sub`",
                         examples=["usr_k3j9x0a1b2"])
    role: Literal["user", "admin"] = Field(
        "user", description="`user` (own data) or `admin` (also the system monitor)")


class DevToken(msgspec.Struct, frozen=True):
    token: str  # a JWT, as `keypulse token` mints it
    user_id: str
    roles: list[str]
    expires_at: int  # epoch seconds (the token's exp)


class DemoUser(msgspec.Struct, frozen=True):
    user_id: str
    requests: int  # in the last hour's windows


class DemoUsers(msgspec.Struct, frozen=True):
    items: list[DemoUser]  # busiest first
    next_cursor: None = None  # one page: the list's shape (DESIGN §8)


def _dev_only(settings: SettingsDep, request: Request) -> None:
    """404 outside dev mode (the route does not exist for a caller); 403 for a browser page of
    another origin than this server's."""
    if not settings.dev:
        raise APIError(404, "not_found", "Not Found")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise APIError(403, "forbidden", "dev sign-in is for pages of this server's origin")


# Checked before anything else the routes depend on (the store, the body): outside dev mode
# the routes answer 404 and touch nothing.
router = APIRouter(prefix="/v1/dev", tags=["dev"], dependencies=[Depends(_dev_only)])

_NOT_DEV = "dev mode is off (`KEYPULSE_DEV` unset): the route does not exist"
_OTHER_ORIGIN = "called from a browser page of another origin"


@router.post("/token", openapi_extra=_ANONYMOUS, summary="mint a dev token",
             responses={**described(DevToken, description="a token for the session"),
                        **failures({400: "the body is not JSON", 403: _OTHER_ORIGIN,
                                    404: _NOT_DEV,
                                    422: "`user_id` or `role` invalid (`field` names it)"})})
def token(body: TokenRequest, settings: SettingsDep, request: Request) -> MsgspecResponse:
    """A token for `user_id` with role `role`, living DEV_TOKEN_TTL_SECONDS (8 h), signed with
    the configured secret. Only in dev mode, whose secret is public anyway: this is the
    dashboard's "sign in as a demo user" (docs/dashboard.md)."""
    clock: Clock = request.app.state.clock
    roles: list[str] = [body.role]
    try:
        jwt = mint_token(settings, body.user_id, roles=roles,
                         ttl_seconds=DEV_TOKEN_TTL_SECONDS, clock=clock)
    except AuthError as exc:
        raise APIError(422, "invalid_request", str(exc), field="user_id") from None
    expires_at = int(clock()) + DEV_TOKEN_TTL_SECONDS
    return MsgspecResponse(DevToken(jwt, body.user_id, roles, expires_at))


_USERS = described(DemoUsers, description="the busiest users of the last hour")
_USERS[200]["content"]["application/json"]["example"] = {
    "items": [{"user_id": "usr_k3j9x0a1b2", "requests": 5400}], "next_cursor": None}


@router.get("/users", openapi_extra=_ANONYMOUS, summary="demo users to sign in as",
            responses={**_USERS, **failures({
                403: _OTHER_ORIGIN, 404: _NOT_DEV,
                422: "`limit` outside 1..50", 503: "the store is unreachable"})})
def users(settings: SettingsDep, request: Request, client: ClickHouseDep,
          limit: Annotated[int, Query(ge=1, le=50, description="at most this many users",
                                      examples=[8])] = 8) -> MsgspecResponse:
    """The users with the most requests in the windows of the last hour, busiest first (the
    ones `keypulse gen` sends for), so the dev sign-in can offer them. Dev mode only."""
    clock: Clock = request.app.state.clock
    since_ms = int(clock() * 1000) - USERS_LOOKBACK_MS
    try:
        result = client.query(
            "SELECT user_id, toInt64(sum(requests)) AS n FROM {db:Identifier}.usage_stats FINAL "
            "WHERE window_start >= fromUnixTimestamp64Milli({since:Int64}, 'UTC') "
            "GROUP BY user_id ORDER BY n DESC, user_id LIMIT {limit:UInt32}",
            parameters={"db": settings.clickhouse_database, "since": since_ms, "limit": limit},
            settings=QUERY_SETTINGS)
    except OperationalError as exc:  # the store went away: 503, not a bug
        msg = f"ClickHouse query failed: {exc!r}"[:300]
        raise ServiceError(msg) from None
    return MsgspecResponse(DemoUsers([DemoUser(str(u), int(n)) for u, n in result.result_rows]))

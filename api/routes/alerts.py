"""Alert history (DESIGN §3, §8): firing first, then newest.

Who: the `user` role (a token without roles acts as one) and `admin`, each for the token's own
`sub`. One item per alert (`alert_id`) in its latest state: `resolved` once a resolved record
exists, else `firing`. Keyset pagination on (firing, fired_at, alert_id): a page continues
strictly after the previous one; an alert that resolves between two pages moves behind the
firing ones, so a walk over every page may show it twice (once in each state), never not at
all.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query

from api.deps import ClickHouseDep, OwnerDep, SettingsDep
from api.params import FromQuery, ToQuery, decode_cursor, encode_cursor, open_range
from api.responses import MsgspecResponse, described, failures
from schemas.alerts import Alert, AlertState
from schemas.events import SERVICE_PATTERN

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])

MAX_LIMIT = 500
_CURSOR_KIND = "alerts"  # a cursor names its route: another route's cursor is refused
_CURSOR: Any = tuple[Literal["alerts"], int, int, str]  # (kind, firing, fired_ms, alert_id)
Position = tuple[int, int, str]


class AlertPage(msgspec.Struct, frozen=True):
    items: list[Alert]
    next_cursor: str | None


_FIELDS = ("alert_id", "rule_id", "rule_name", "user_id", "service", "metric", "op",
           "threshold", "value", "severity", "state", "window_start", "window_end", "fired_at",
           "resolved_at", "message", "schema_version")


def alert_page(client: Client, database: str, user_id: str, *, state: AlertState | None,
               service: str | None, from_ms: int | None, to_ms: int | None, limit: int,
               after: Position | None) -> tuple[list[Alert], Position | None]:
    """The user's alerts in their latest state, firing first then newest fired, strictly
    after `after`; and the position after the page (None on the last page)."""
    inner = ["user_id = {user:String}"]
    outer = ["1"]
    params: dict[str, Any] = {"user": user_id, "limit": limit + 1}
    if service is not None:
        inner.append("service = {service:String}")
        params["service"] = service
    if from_ms is not None:
        inner.append("fired_at >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')")
        params["from_ms"] = from_ms
    if to_ms is not None:
        inner.append("fired_at < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')")
        params["to_ms"] = to_ms
    if state is not None:
        outer.append("state = {state:String}")
        params["state"] = state.value
    if after is not None:
        outer.append("(firing, fired_ms, alert_id) < "
                     "({a_firing:UInt8}, {a_ms:Int64}, {a_id:String})")
        params["a_firing"], params["a_ms"], params["a_id"] = after
    # FINAL: one row per (alert_id, state); LIMIT 1 BY keeps the resolved one when there is.
    rows = client.query(
        f"SELECT {', '.join(_FIELDS)}, firing, fired_ms FROM ("
        f" SELECT {', '.join(_FIELDS)}, toUInt8(state = 'firing') AS firing,"
        "  toUnixTimestamp64Milli(fired_at) AS fired_ms"
        f" FROM {database}.alerts FINAL WHERE {' AND '.join(inner)}"
        "  ORDER BY alert_id, firing LIMIT 1 BY alert_id"
        f") WHERE {' AND '.join(outer)} "
        "ORDER BY firing DESC, fired_ms DESC, alert_id DESC LIMIT {limit:UInt32}",
        parameters=params).result_rows
    items = [msgspec.convert(dict(zip(_FIELDS, row[:len(_FIELDS)], strict=True)), Alert)
             for row in rows[:limit]]
    if len(rows) <= limit:
        return items, None
    last = rows[limit - 1]
    return items, (int(last[-2]), int(last[-1]), str(last[0]))


@router.get("", summary="the caller's alert history", responses={
    **described(AlertPage, description="the caller's alerts: firing first, then newest"),
    **failures({400: "a bad `from`, `to` or `cursor` (the field says which); `to` not after "
                     "`from`",
                401: "no valid bearer token",
                403: "the token holds neither the user nor the admin role",
                422: "a parameter has the wrong type or is out of bounds (`field` names it)",
                503: "the store is unreachable; retry after `Retry-After` seconds"})})
def list_alerts(
    user: OwnerDep,
    settings: SettingsDep,
    client: ClickHouseDep,
    state: Annotated[AlertState | None, Query(
        description="only alerts now in this state", examples=["firing"])] = None,
    service: Annotated[str | None, Query(
        description="only this service's alerts", pattern=SERVICE_PATTERN, max_length=64,
        examples=["openai"])] = None,
    from_: FromQuery = None,
    to: ToQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="alerts per page")] = 100,
    cursor: Annotated[str | None, Query(
        max_length=512, description="`next_cursor` of the previous page",
        examples=[encode_cursor([_CURSOR_KIND, 1, 1764590400000, "alert-1"])])] = None,
) -> MsgspecResponse:
    """The caller's alerts fired in `[from, to)` (default: all of them), one per alert in
    its latest state; `state` and `service` narrow them. Currently firing first, then newest
    fired first."""
    from_ms, to_ms = open_range(from_, to)
    after = None
    if cursor is not None:
        _kind, firing, fired_ms, alert_id = decode_cursor(cursor, _CURSOR)
        after = (firing, fired_ms, alert_id)
    items, last = alert_page(client, settings.clickhouse_database, user.user_id, state=state,
                             service=service, from_ms=from_ms, to_ms=to_ms, limit=limit,
                             after=after)
    next_cursor = None if last is None else encode_cursor([_CURSOR_KIND, *last])
    return MsgspecResponse(AlertPage(items=items, next_cursor=next_cursor))

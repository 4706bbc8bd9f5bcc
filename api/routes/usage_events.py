"""`GET /v1/usage/events` and `GET /v1/usage/export` (DESIGN §8): a user's raw events, newest
first with a cursor, and usage reports (events or hourly/daily rollups) streamed as CSV or
parquet.

Who: `user` (a token without roles acts as one) and `admin`, each for the token's own `sub`;
the owner never comes from a parameter. Every bad parameter answers 400 naming it (the
declared types and bounds included, see `_QueryRoute`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any, Literal

import pyarrow as pa
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.responses import StreamingResponse

from api import deps, usage_events
from api.deps import ClickHouseDep, SettingsDep
from api.params import (
    MAX_RANGE_DAYS,
    FromQuery,
    TimeRange,
    ToQuery,
    bad,
    decode_cursor,
    encode_cursor,
    iso,
)
from api.responses import MsgspecResponse, described, failures
from api.usage_events import (
    EVENT_COLUMNS,
    ROLLUP_COLUMNS,
    WRITERS,
    EventFilter,
    EventPage,
    ExportData,
    ExportFormat,
    StatusClass,
)
from core.clock import Clock
from schemas.events import SERVICE_PATTERN

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000
_CURSOR_KIND = "usage_events"  # a cursor names its route: another route's cursor is refused
_CURSOR: Any = tuple[Literal["usage_events"], int, str]  # (kind, ts_ms, event_id)


class _QueryRoute(APIRoute):
    """A parameter that breaks its declared type or bounds answers 400 naming it, as the
    checks of api.params do, rather than FastAPI's 422 (DESIGN §8: a bad parameter is a
    400)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first: dict[str, Any] = next(iter(exc.errors()), {})
                field = str(first.get("loc", ("", "query"))[-1])
                msg = f"{field}: {first.get('msg', 'invalid value')}"
                raise bad(msg, field) from None

        return checked


router = APIRouter(prefix="/v1/usage", tags=["usage"], route_class=_QueryRoute)


def _owner(user: deps.OwnerDep) -> str:
    return user.user_id


OwnerIdDep = Annotated[str, Depends(_owner)]
ServiceQuery = Annotated[
    str | None,
    Query(description="only this service's rows", pattern=SERVICE_PATTERN, max_length=64,
          examples=["openai"]),
]

_AUTH_FAILURES = {401: "no valid bearer token",
                  403: "the token holds neither the user nor the admin role",
                  503: "the store is unreachable; retry after `Retry-After` seconds"}


def _now_ms(request: Request) -> int:
    clock: Clock = request.app.state.clock
    return int(clock() * 1000)


@router.get("/events", responses={
    **described(EventPage, description="the caller's events, newest first"),
    **failures({400: "a bad `from`, `to`, `service`, `status_class`, `limit` or `cursor` "
                     "(the field says which); a range beyond the raw events' retention",
                **_AUTH_FAILURES}),
})
def list_events(
    owner: OwnerIdDep,
    request: Request,
    settings: SettingsDep,
    client: ClickHouseDep,
    from_: FromQuery = None,
    to: ToQuery = None,
    service: ServiceQuery = None,
    status_class: Annotated[StatusClass | None, Query(
        description="only events whose status code is in this class", examples=["5xx"])] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="events per page")] = 100,
    cursor: Annotated[str | None, Query(
        max_length=512, description="`next_cursor` of the previous page",
        examples=[encode_cursor([_CURSOR_KIND, 1764590400000, "evt-1"])])] = None,
) -> MsgspecResponse:
    """The caller's raw events in `[from, to)` (default: the last 24 h), newest first.

    Keyset pagination on (ts, event_id): a page continues strictly below the previous one,
    so events stored meanwhile never shift or repeat later pages. Pass `from` and `to` to
    page through a fixed range."""
    span = TimeRange.of(from_, to, _now_ms(request), max_days=settings.events_ttl_days)
    before = None
    if cursor is not None:
        _kind, ts_ms, event_id = decode_cursor(cursor, _CURSOR)
        before = (ts_ms, event_id)
    found = EventFilter(owner, span.from_ms, span.to_ms, service, status_class)
    items, last = usage_events.events_page(client, settings.clickhouse_database, found, limit,
                                           before)
    next_cursor = None if last is None else encode_cursor([_CURSOR_KIND, *last])
    return MsgspecResponse(EventPage(items=items, next_cursor=next_cursor))


_EXPORT_OK: dict[int | str, dict[str, Any]] = {200: {
    "description": "the file, streamed as it is read (an attachment)",
    "headers": {"Content-Disposition": {
        "description": "attachment; filename=keypulse-<data>-<from>-<to>.<format>",
        "schema": {"type": "string"}}},
    "content": {
        "text/csv": {"schema": {"type": "string"}},
        "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
    },
}}


def _primed(chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """The chunks with the first one already read, so the store's errors answer before the
    response has started."""
    first = next(chunks, None)
    return chunks if first is None else itertools.chain([first], chunks)


def _stamp(ms: int) -> str:
    """An instant for a file name: 20261201T120000Z."""
    return iso(ms).replace("-", "").replace(":", "").replace(".000", "")


@router.get("/export", response_class=StreamingResponse, responses={
    **_EXPORT_OK,
    **failures({400: "a bad `format`, `data`, `from`, `to` or `service` (the field says which); "
                     "a range longer than the data's retention (raw events: "
                     "KEYPULSE_EVENTS_TTL_DAYS; rollups: 400 days)",
                **_AUTH_FAILURES}),
})
def export(
    owner: OwnerIdDep,
    request: Request,
    settings: SettingsDep,
    client: ClickHouseDep,
    format: Annotated[ExportFormat, Query(description="the file's format")] = ExportFormat.CSV,
    data: Annotated[ExportData, Query(
        description="raw events, or the hourly or daily rollups")] = ExportData.EVENTS,
    from_: FromQuery = None,
    to: ToQuery = None,
    service: ServiceQuery = None,
) -> StreamingResponse:
    """The caller's events (oldest first), or the rollups whose bucket starts in `[from, to)`
    (by bucket, then service: the stats record's figures over each bucket, percentiles from
    its merged latency sketch), as a CSV or parquet download. Default range: the last 24 h.

    Streamed: read and written in chunks of `CHUNK_ROWS` rows (one parquet row group each),
    never the whole result in memory."""
    max_days = settings.events_ttl_days if data is ExportData.EVENTS else MAX_RANGE_DAYS
    span = TimeRange.of(from_, to, _now_ms(request), max_days=max_days)
    found = EventFilter(owner, span.from_ms, span.to_ms, service)
    size = usage_events.CHUNK_ROWS
    database = settings.clickhouse_database
    if data is ExportData.EVENTS:
        columns = EVENT_COLUMNS
        chunks = usage_events.event_chunks(client, database, found, size)
    else:
        columns = ROLLUP_COLUMNS
        chunks = usage_events.rollup_chunks(client, database, data, found, size)
    body = WRITERS[format](columns, _primed(chunks))
    name = f"keypulse-{data.value}-{_stamp(span.from_ms)}-{_stamp(span.to_ms)}.{format.value}"
    logger.debug("export of %s for %s as %s", data.value, owner, name)
    return StreamingResponse(body, media_type=format.media_type,
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})

"""A user's usage analytics (DESIGN §8): summary, time series and breakdown (api/analytics.py).

Who: the `user` role (a token without roles acts as one) and `admin`, always for the token's
own `sub`: the user is never a parameter. `ingest`, `service` or `analyst` alone: 403.

Parameters are checked before the store is touched, each problem a 400 naming its parameter:
`from`/`to` (api.params.TimeRange: `[from, to)`, `to` after `from`, at most 400 days; default
the last 24 h), `interval` (10s, 1m, 1h, 1d; at most MAX_POINTS buckets), `by` (service,
api_key, endpoint, status_class).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from api import analytics
from api.analytics import By, Span
from api.deps import ClickHouseDep, OwnerDep, SettingsDep
from api.params import FromQuery, Interval, TimeRange, ToQuery, bad
from api.responses import MsgspecResponse, described, failures
from core.clock import Clock

router = APIRouter(prefix="/v1/usage", tags=["usage"])

MAX_POINTS = 1_500  # a day at 1 m is 1,440 points
MAX_ROWS = 1_000


UserDep = OwnerDep
ServiceQuery = Annotated[str | None, Query(
    description="only this service (all of the user's services when absent)",
    max_length=128, examples=["openai"])]


def time_range(request: Request, from_: FromQuery = None, to: ToQuery = None) -> TimeRange:
    """`[from, to)` from the query (default: the 24 h up to now, by the app's clock). Every
    parameter of these routes holds one value: one given twice is a 400, not a silent pick."""
    for name in request.query_params:
        if len(request.query_params.getlist(name)) > 1:
            msg = f"{name[:64]}: given more than once"
            raise bad(msg, name[:64])
    clock: Clock = request.app.state.clock
    return TimeRange.of(from_, to, int(clock() * 1000))


RangeDep = Annotated[TimeRange, Depends(time_range)]


def series_interval(
    span: RangeDep,
    interval: Annotated[str, Query(
        description="the step: 10s (the stats windows), 1m, 1h or 1d (the rollups)",
        json_schema_extra={"enum": [i.value for i in Interval]})] = Interval.M1.value,
) -> tuple[Interval, Span]:
    """The interval, and the range snapped to it; 400 when unknown or too many points."""
    try:
        step = Interval(interval)
    except ValueError:
        msg = f"interval: one of {', '.join(i.value for i in Interval)}"
        raise bad(msg, "interval") from None
    snapped = analytics.snap(span.from_ms, span.to_ms, step.ms)
    points = (snapped.to_ms - snapped.from_ms) // step.ms
    if points > MAX_POINTS:
        msg = (f"interval: {step.value} over this range gives {points:,} points, more than "
               f"{MAX_POINTS:,}; choose a coarser interval or a shorter range")
        raise bad(msg, "interval")
    return step, snapped


def breakdown_by(
    by: Annotated[str, Query(
        description="group by service (from the windows), or api_key, endpoint or "
                    "status_class (from the raw events, late ones included)",
        json_schema_extra={"enum": [b.value for b in By]})],
) -> By:
    try:
        return By(by)
    except ValueError:
        msg = f"by: one of {', '.join(b.value for b in By)}"
        raise bad(msg, "by") from None


ERRORS = {400: "a parameter is invalid (`field` names it): `from`/`to` unreadable, `to` not "
               "after `from`, a range over 400 days, a parameter given twice",
          401: "no valid bearer token", 403: "the token holds neither the user nor the admin role",
          422: "a parameter has the wrong type or is out of bounds (`field` names it)",
          503: "the store is unreachable; retry after `Retry-After` seconds"}


def _window_ms(settings: SettingsDep) -> int:
    return settings.window_seconds * 1000


def _rollups(span: Span, request: Request, settings: SettingsDep) -> tuple[str, ...]:
    """The rollups a summary or a breakdown by service reads besides the windows: none for a
    range of a day or less whose windows are all kept (one source to plan and read costs
    less than three: a 24 h summary 14 ms instead of 37 for a typical user of
    bench/api.py's store, 35 instead of 49 for the heaviest); the minutes too when the
    windows at the range's start are past their retention."""
    clock: Clock = request.app.state.clock
    kept_from = int(clock() * 1000) - settings.stats_ttl_days * analytics.DAY_MS
    if span.from_ms < kept_from:
        return analytics.EVERY_ROLLUP
    if span.to_ms - span.from_ms <= analytics.WINDOWS_ONLY_MS:
        return ()
    return analytics.SUMMARY_ROLLUPS


def _fresh_ms(request: Request, settings: SettingsDep) -> int:
    """From when on windows may still be arriving: now less a window and the allowed
    lateness (analytics.plan reads that part, and what the rollups may lag, from the
    windows themselves)."""
    clock: Clock = request.app.state.clock
    return int(clock() * 1000) - (settings.window_seconds
                                  + settings.allowed_lateness_seconds) * 1000


@router.get("/summary", responses={**described(analytics.Summary), **failures(ERRORS)})
def summary(user: UserDep, span: RangeDep, settings: SettingsDep, client: ClickHouseDep,
            request: Request, service: ServiceQuery = None) -> MsgspecResponse:
    """The figures of the caller's windows starting in `[from, to)` (snapped up to the
    window grid: `from`/`to` in the answer). Nothing there: zeros and null latencies."""
    snapped = analytics.snap(span.from_ms, span.to_ms, _window_ms(settings))
    return MsgspecResponse(analytics.summary(client, settings.clickhouse_database,
                                             user.user_id, snapped, service,
                                             _fresh_ms(request, settings),
                                             _rollups(snapped, request, settings)))


@router.get("/timeseries", responses={
    **described(analytics.Series),
    **failures({**ERRORS, 400: ERRORS[400] + "; `interval` unknown or giving more than "
                f"{MAX_POINTS:,} points"})})
def timeseries(user: UserDep, step: Annotated[tuple[Interval, Span], Depends(series_interval)],
               settings: SettingsDep, client: ClickHouseDep, request: Request,
               service: ServiceQuery = None) -> MsgspecResponse:
    """The figures per `interval` bucket starting in `[from, to)` (both snapped up to the
    interval), oldest first; buckets without requests are left out."""
    interval, snapped = step
    return MsgspecResponse(analytics.timeseries(client, settings.clickhouse_database,
                                                user.user_id, snapped, interval, service,
                                                _fresh_ms(request, settings)))


@router.get("/breakdown", responses={
    **described(analytics.Breakdown),
    **failures({**ERRORS, 400: ERRORS[400] + "; `by` unknown"})})
def breakdown(user: UserDep, span: RangeDep, by: Annotated[By, Depends(breakdown_by)],
              settings: SettingsDep, client: ClickHouseDep, request: Request,
              service: ServiceQuery = None,
              limit: Annotated[int, Query(ge=1, le=MAX_ROWS,
                                          description="at most this many groups")] = 100,
              ) -> MsgspecResponse:
    """The figures per group over `[from, to)` (snapped up to the window grid), most
    requests first."""
    snapped = analytics.snap(span.from_ms, span.to_ms, _window_ms(settings))
    return MsgspecResponse(analytics.breakdown(client, settings.clickhouse_database,
                                               user.user_id, snapped, by, service, limit,
                                               _fresh_ms(request, settings),
                                               _rollups(snapped, request, settings)))

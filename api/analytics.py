"""Usage analytics: the queries behind `/v1/usage/summary`, `timeseries` and `breakdown`.

Every figure is under the stats record's field name (DESIGN §2, §8). Counts, sums and the
latency maximum add up across windows; the percentiles come from the windows' latency
sketches merged in ClickHouse (`sumMap` of `latency_bins`/`latency_bin_counts`) and read by
core.sketch.quantile (in the engine for a series: `sql_quantile`, the same nearest rank, within
±0.5 %, capped by the maximum), never from an average of window percentiles; the average is
`latency_sum_ms / requests`.

A window counts when its start lies in `[from, to)`. A long range is decomposed exactly
(`plan`): whole days from `usage_rollup_1d`, the whole hours left from `usage_rollup_1h`, and
the windows at the edges from `usage_stats` (a third rollup table, the minutes, costs more
than the at most two hours of windows it would save), every table read with FINAL, all in
one UNION ALL query, each part on the key prefix `(user_id, service, time)` so nobody
else's rows are read. A time series reads its interval's rollup (and the windows). The
breakdowns by API key, endpoint and status class have no stats to read: they aggregate
`usage_events FINAL`, with the same sketch computed in SQL (core.sketch.SQL_BIN), so they
also count late events.

    summary(client, database, user_id, span, service, fresh_ms, rollups)              → Summary
    timeseries(client, database, user_id, span, interval, service, fresh_ms)         → Series
    breakdown(client, database, user_id, span, by, service, limit, fresh_ms, rollups) → Breakdown

`span` is the `[from, to)` already snapped to the grid of what is read (`snap`). The rollups
are recomputed a little after their windows are stored (pipeline/rollups.py), so the recent
part of a range (`fresh_ms`, see `plan`) is read from finer tables: answers are exact also
while the rollups catch up.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

from api.params import Interval, iso
from core import sketch
from core.errors import ServiceError

logger = logging.getLogger(__name__)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

Latency = Annotated[float | None, msgspec.Meta(
    description="milliseconds; null when there are no requests")]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1, description="a fraction; 0 with no requests")]


class Figures(msgspec.Struct, kw_only=True, frozen=True):
    """The stats record's figures (DESIGN §2) over a set of windows or events."""

    requests: int
    successes: int  # status < 400
    client_errors: int  # 400..499
    server_errors: int  # 500..599
    success_rate: Rate
    error_rate: Rate
    server_error_rate: Rate
    latency_avg_ms: Latency
    latency_p50_ms: Latency
    latency_p95_ms: Latency
    latency_p99_ms: Latency
    latency_max_ms: Latency
    tokens_in: int
    tokens_out: int
    cost_usd: float


Start = Annotated[str, msgspec.Meta(
    description="the effective start (RFC 3339): `from` snapped up to the grid")]
End = Annotated[str, msgspec.Meta(
    description="the effective end (RFC 3339): `to` snapped up to the grid")]
Windows = Annotated[int, msgspec.Meta(description="how many stats windows the figures cover")]
BucketStart = Annotated[str, msgspec.Meta(description="the bucket's start (RFC 3339)")]
Group = Annotated[str, msgspec.Meta(
    description="the service, API key id, endpoint or status class (2xx, 4xx...)")]


class Summary(Figures, kw_only=True, frozen=True):
    """One user's figures over the windows starting in `[from, to)`: zeros and null
    latencies when nothing happened."""

    from_: Start = msgspec.field(name="from")
    to: End
    windows: Windows


class Point(Figures, kw_only=True, frozen=True):
    """One bucket of a series."""

    time: BucketStart


class Series(msgspec.Struct, kw_only=True, frozen=True):
    """A user's figures per bucket."""

    from_: Start = msgspec.field(name="from")
    to: End
    interval: str
    points: Annotated[list[Point], msgspec.Meta(
        description="oldest first; buckets without requests are left out")]


class Row(Figures, kw_only=True, frozen=True):
    """One group of a breakdown."""

    group: Group


class Breakdown(msgspec.Struct, kw_only=True, frozen=True):
    """A user's figures per group."""

    from_: Start = msgspec.field(name="from")
    to: End
    by: str
    rows: Annotated[list[Row], msgspec.Meta(description="most requests first, at most `limit`")]


class By(enum.StrEnum):
    """What a breakdown groups by."""

    SERVICE = "service"
    API_KEY = "api_key"
    ENDPOINT = "endpoint"
    STATUS_CLASS = "status_class"


@dataclass(frozen=True)
class Span:
    """`[from_ms, to_ms)` in epoch ms."""

    from_ms: int
    to_ms: int


def snap(from_ms: int, to_ms: int, step_ms: int) -> Span:
    """The range whose grid points are the same as `[from_ms, to_ms)`'s: both ends rounded up
    to `step_ms` (the grid starts at the epoch). What starts in one starts in the other."""
    return Span(-(-from_ms // step_ms) * step_ms, -(-to_ms // step_ms) * step_ms)


STATS = "usage_stats"
# Each rollup: its bucket, and how long after the windows its row may lag: the rollup writer
# (pipeline/rollups.py) recomputes minutes at most 2 s after their windows are stored, hours
# a minute after their minutes, days ten minutes after their hours.
ROLLUPS = {"usage_rollup_1d": (DAY_MS, 15 * MINUTE_MS), "usage_rollup_1h": (HOUR_MS, 3 * MINUTE_MS),
           "usage_rollup_1m": (MINUTE_MS, 10_000)}
# What a summary (and a breakdown by service) reads besides the windows. Each more table read
# costs more than the rows it saves: the minutes would replace at most two hours of windows
# at the edges, so whole minutes are read from the windows themselves (measured: docs/api.md).
SUMMARY_ROLLUPS = ("usage_rollup_1d", "usage_rollup_1h")
# A range this short reads the windows alone (api/routes/usage.py): fewer sources, less time.
WINDOWS_ONLY_MS = DAY_MS
# ... unless the windows at the edges are past their retention (and the minutes are not).
EVERY_ROLLUP = ("usage_rollup_1d", "usage_rollup_1h", "usage_rollup_1m")
# What a series of each interval reads besides the windows (its recent buckets among them).
SERIES_ROLLUPS = {Interval.S10: (), Interval.M1: ("usage_rollup_1m",),
                  Interval.H1: ("usage_rollup_1h",),
                  Interval.D1: ("usage_rollup_1d", "usage_rollup_1h")}


def plan(span: Span, fresh_ms: int | None = None,
         rollups: Sequence[str] = SUMMARY_ROLLUPS) -> dict[str, list[Span]]:
    """`span` cut into the whole buckets of each of `rollups` in turn (coarsest first), then
    the rest: which table answers which part. The parts are disjoint and cover `span`, so
    what starts in `span` is counted exactly once.

    `fresh_ms`: the windows starting from then on may still be arriving (now less the
    windows' length and allowed lateness); a rollup answers only for buckets that end at
    least its lag before it, so a recent part is read from a finer table, exactly, even
    while the rollups catch up."""
    parts: dict[str, list[Span]] = {}
    rest = [span]
    for table in sorted(rollups, key=lambda name: -ROLLUPS[name][0]):
        step, lag = ROLLUPS[table]
        left: list[Span] = []
        for piece in rest:
            end = piece.to_ms if fresh_ms is None else min(piece.to_ms, fresh_ms - lag)
            lo = -(-piece.from_ms // step) * step
            hi = end // step * step
            if lo < hi:
                parts.setdefault(table, []).append(Span(lo, hi))
                left += [Span(a, b) for a, b in ((piece.from_ms, lo), (hi, piece.to_ms)) if a < b]
            else:
                left.append(piece)
        rest = left
    if rest:
        parts[STATS] = rest
    return parts


# Each source in one shape: service, t_ms, windows, requests, successes, client_errors,
# server_errors, latency_sum_ms, latency_max_ms, bins, bin_counts, tokens_in, tokens_out, cost_usd
_STATS_COLUMNS = (
    "service, toUnixTimestamp64Milli(window_start) AS t_ms, toUInt32(1) AS windows, requests, "
    "successes, client_errors, server_errors, latency_sum_ms, latency_max_ms, "
    "latency_bins AS bins, CAST(latency_bin_counts, 'Array(UInt64)') AS bin_counts, "
    "tokens_in, tokens_out, cost_usd")
_ROLLUP_COLUMNS = (
    "service, toInt64(toUnixTimestamp(bucket_start)) * 1000 AS t_ms, windows, requests, "
    "successes, client_errors, server_errors, latency_sum_ms, latency_max_ms, "
    "latency_bins AS bins, latency_bin_counts AS bin_counts, tokens_in, tokens_out, cost_usd")
# Every aggregate in one shape: grp, n_windows, n_requests, n_successes, n_client, n_server,
# latency_sum, top (the largest latency), sketch (the merged bins), tokens_in, tokens_out, cost
_MERGED = (
    "sum(windows) AS n_windows, sum(requests) AS n_requests, sum(successes) AS n_successes, "
    "sum(client_errors) AS n_client, sum(server_errors) AS n_server, "
    "sum(latency_sum_ms) AS latency_sum, max(latency_max_ms) AS top, "
    "sumMap(bins, bin_counts) AS sketch, sum(tokens_in) AS n_tokens_in, "
    "sum(tokens_out) AS n_tokens_out, sum(cost_usd) AS cost")
_RAW = (
    "toUInt64(0) AS n_windows, count() AS n_requests, countIf(status_code < 400) AS n_successes, "
    "countIf(status_code >= 400 AND status_code < 500) AS n_client, "
    "countIf(status_code >= 500) AS n_server, sum(latency_ms) AS latency_sum, "
    f"max(latency_ms) AS top, sumMap([{sketch.SQL_BIN}], [toUInt64(1)]) AS sketch, "
    "sum(ifNull(tokens_in, 0)) AS n_tokens_in, sum(ifNull(tokens_out, 0)) AS n_tokens_out, "
    "sum(ifNull(cost_usd, 0)) AS cost")
QUANTILES = (0.50, 0.95, 0.99)


def sql_quantile(q: float) -> str:
    """core.sketch.quantile(keys, counts, q, max_ms) in ClickHouse SQL, over an aggregate's
    merged bins as `SKETCH_COLUMNS` spell them (`keys`, their cumulative counts `cum`, the
    total `n`) and `top` (the largest latency): the same nearest rank, the same
    representative, the same cap (tests/api/test_usage.py holds the two equal). Each
    subexpression is spelled once: the engine's analysis of a long expression costs more than
    the arithmetic."""
    rank = f"greatest(1, toUInt64(ceil({q!r} * n)))"
    key = f"keys[arrayFirstIndex(c -> c >= {rank}, cum)]"
    value = (f"if({key} = {sketch.ZERO_BIN}, 0., "
             f"2 * pow({sketch.GAMMA!r}, {key}) / {sketch.GAMMA + 1!r})")
    return f"if(n = 0, NULL, if({rank} >= n, top, least(top, {value})))"


SKETCH_COLUMNS = "sketch.1 AS keys, arrayCumSum(sketch.2) AS cum, arraySum(sketch.2) AS n"
_FIGURES = "grp, n_windows, n_requests, n_successes, n_client, n_server, latency_sum, top"
_TOTALS = "n_tokens_in, n_tokens_out, cost"
_READ = f"{_FIGURES}, " + ", ".join(sql_quantile(q) for q in QUANTILES) + f", {_TOTALS}"


# A series' aggregate does not merge its bins: it concatenates them (`_UNMERGED`), and the
# percentiles are read from the pairs sorted by key, whose cumulative counts are those of the
# merged bins. sumMap's merge cost 110 ms of the 160 ms a 720-point series took (bench/api.py).
_UNMERGED = _MERGED.replace(
    "sumMap(bins, bin_counts) AS sketch",
    "groupArrayArray(bins) AS all_keys, groupArrayArray(bin_counts) AS all_counts")
SORTED_COLUMNS = ("arraySort(all_keys) AS keys, "
                  "arrayCumSum(arraySort((c, k) -> k, all_counts, all_keys)) AS cum, "
                  "arraySum(all_counts) AS n")


def _read(aggregate: str, order: str = "") -> str:
    """The figures of an aggregate query (in `_UNMERGED`'s shape), percentiles read in the
    engine: a series of 1,440 points answers three numbers a point instead of its bins."""
    return (f"SELECT {_READ} FROM (SELECT *, {SORTED_COLUMNS} FROM ({aggregate})){order}")


def _read_bins(aggregate: str, order: str = "") -> str:
    """The figures of an aggregate query with its merged bins, for `_quantiles` to read: for
    a few rows, reading them in Python costs less than the engine's analysis of the
    percentile expressions (about 15 ms a query)."""
    return f"SELECT {_FIGURES}, sketch, {_TOTALS} FROM ({aggregate}){order}"


def _quantiles(row: Sequence[Any]) -> list[Any]:
    """A `_read_bins` row as `_read` answers it: the bins replaced by the percentiles."""
    keys, counts = row[8]
    top = row[7]
    return [*row[:8], *(sketch.quantile(keys, counts, q, top) for q in QUANTILES), *row[9:]]


_RAW_GROUPS = {
    By.API_KEY: "api_key_id",
    By.ENDPOINT: "endpoint",
    By.STATUS_CLASS: "concat(toString(intDiv(status_code, 100)), 'xx')",
}


class _Query:
    """A query's text and its server-side parameters, built side by side."""

    def __init__(self, database: str, user_id: str, service: str | None) -> None:
        self.parameters: dict[str, Any] = {"db": database, "user": user_id}
        self.owner = "user_id = {user:String}"
        if service is not None:
            self.parameters["service"] = service
            self.owner += " AND service = {service:String}"

    def bounds(self, column: str, spans: Sequence[Span], seconds: bool) -> str:
        """`column` in any of `spans` (a DateTime in seconds or a DateTime64(3))."""
        cast = ("toDateTime(intDiv({%s:Int64}, 1000), 'UTC')" if seconds
                else "fromUnixTimestamp64Milli({%s:Int64}, 'UTC')")
        terms = []
        for piece in spans:
            lo, hi = f"p{len(self.parameters)}", f"p{len(self.parameters) + 1}"
            self.parameters[lo], self.parameters[hi] = piece.from_ms, piece.to_ms
            terms.append(f"({column} >= {cast % lo} AND {column} < {cast % hi})")
        return "(" + " OR ".join(terms) + ")"

    def source(self, table: str, spans: Sequence[Span]) -> str:
        if table == STATS:
            return (f"SELECT {_STATS_COLUMNS} FROM {{db:Identifier}}.{STATS} FINAL "
                    f"WHERE {self.owner} AND {self.bounds('window_start', spans, False)}")
        return (f"SELECT {_ROLLUP_COLUMNS} FROM {{db:Identifier}}.{table} FINAL "
                f"WHERE {self.owner} AND {self.bounds('bucket_start', spans, True)}")


# One thread a query: a dashboard's query reads a few granules, and a second thread only
# competes with the server's other requests (and the pipeline) for the cores.
QUERY_SETTINGS = {"max_threads": 1}


def _rows(client: Client, sql: str, parameters: dict[str, Any]) -> Sequence[Sequence[Any]]:
    try:
        rows: Sequence[Sequence[Any]] = client.query(
            sql, parameters=parameters, settings=QUERY_SETTINGS).result_rows
    except OperationalError as exc:  # the server went away: 503, not a bug
        msg = f"ClickHouse query failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        raise ServiceError(msg) from None
    return rows


def figures(row: Sequence[Any]) -> dict[str, Any]:
    """The figures of a row `_read` answered, after its group (zeros and null latencies when
    it counts no request). Called once per point of a series: kept to plain arithmetic."""
    (_windows, n, ok, client_errors, server_errors, latency_sum, top, p50, p95, p99,
     tokens_in, tokens_out, cost) = row
    if not n:
        return {"requests": 0, "successes": 0, "client_errors": 0, "server_errors": 0,
                "success_rate": 0.0, "error_rate": 0.0, "server_error_rate": 0.0,
                "latency_avg_ms": None, "latency_p50_ms": None, "latency_p95_ms": None,
                "latency_p99_ms": None, "latency_max_ms": None, "tokens_in": tokens_in,
                "tokens_out": tokens_out, "cost_usd": cost}
    return {
        "requests": n, "successes": ok, "client_errors": client_errors,
        "server_errors": server_errors, "success_rate": ok / n,
        "error_rate": (client_errors + server_errors) / n, "server_error_rate": server_errors / n,
        "latency_avg_ms": latency_sum / n, "latency_p50_ms": p50, "latency_p95_ms": p95,
        "latency_p99_ms": p99, "latency_max_ms": top, "tokens_in": tokens_in,
        "tokens_out": tokens_out, "cost_usd": cost,
    }


def summary(client: Client, database: str, user_id: str, span: Span,
            service: str | None = None, fresh_ms: int | None = None,
            rollups: Sequence[str] = SUMMARY_ROLLUPS) -> Summary:
    """`user_id`'s figures over the windows starting in `span`, in one query: the rollups
    for the whole days and hours inside it, the stats windows for its edges (and for what
    the rollups may not hold yet: `plan`)."""
    query = _Query(database, user_id, service)
    sources = [query.source(table, spans)
               for table, spans in plan(span, fresh_ms, rollups).items()]
    if sources:
        sql = _read_bins(f"SELECT '' AS grp, {_MERGED} FROM ("
                         + " UNION ALL ".join(sources) + ")")
        row = _quantiles(_rows(client, sql, query.parameters)[0])[1:]
    else:
        row = [0, 0, 0, 0, 0, 0.0, 0.0, None, None, None, 0, 0, 0.0]
    return Summary(from_=iso(span.from_ms), to=iso(span.to_ms), windows=int(row[0]),
                   **figures(row))


def timeseries(client: Client, database: str, user_id: str, span: Span, interval: Interval,
               service: str | None = None, fresh_ms: int | None = None) -> dict[str, Any]:
    """`user_id`'s figures per bucket of `interval` (10s: the stats windows; 1m, 1h, 1d: that
    rollup, and finer tables for its recent buckets: `plan`, SERIES_ROLLUPS), for the buckets
    starting in `span` (snapped to `interval`); empty buckets are left out.

    The answer is a `Series` built as plain dicts, which msgspec encodes to the same bytes:
    making 1,440 `Point` Structs cost 22 ms, the dicts about 9 ms (bench/api.py)."""
    answer: dict[str, Any] = {"from": iso(span.from_ms), "to": iso(span.to_ms),
                              "interval": interval.value, "points": []}
    query = _Query(database, user_id, service)
    sources = [query.source(table, spans)
               for table, spans in plan(span, fresh_ms, SERIES_ROLLUPS[interval]).items()]
    if not sources:
        return answer
    query.parameters["step"] = interval.ms
    sql = _read(f"SELECT intDiv(t_ms, {{step:Int64}}) * {{step:Int64}} AS grp, {_UNMERGED} "
                "FROM (" + " UNION ALL ".join(sources) + ") GROUP BY grp", " ORDER BY grp")
    answer["points"] = [_point(row) for row in _rows(client, sql, query.parameters)]
    return answer


def _point(row: Sequence[Any]) -> dict[str, Any]:
    """A `Point` as a dict, from a `_read` row of a bucket (its start first)."""
    point = figures(row[1:])
    seconds, ms = divmod(int(row[0]), 1000)
    point["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"
    return point


def breakdown(client: Client, database: str, user_id: str, span: Span, by: By,
              service: str | None = None, limit: int = 100, fresh_ms: int | None = None,
              rollups: Sequence[str] = SUMMARY_ROLLUPS) -> Breakdown:
    """`user_id`'s figures per group, most requests first. By service: the windows (as in
    `summary`); by API key, endpoint or status class: the raw events with `ts` in `span`,
    late ones included (the windows do not count those)."""
    query = _Query(database, user_id, service)
    query.parameters["limit"] = limit
    order = " ORDER BY n_requests DESC, grp LIMIT {limit:UInt32}"
    if by is By.SERVICE:
        sources = [query.source(table, spans)
                   for table, spans in plan(span, fresh_ms, rollups).items()]
        sql = _read_bins(f"SELECT service AS grp, {_MERGED} FROM ("
                         + " UNION ALL ".join(sources) + ") GROUP BY grp", order) if sources else ""
    else:
        sql = _read_bins(f"SELECT {_RAW_GROUPS[by]} AS grp, {_RAW} FROM "
                         f"{{db:Identifier}}.usage_events FINAL WHERE {query.owner} AND "
                         f"{query.bounds('ts', [span], False)} GROUP BY grp", order)
    rows = [_quantiles(row) for row in _rows(client, sql, query.parameters)] if sql else []
    return Breakdown(from_=iso(span.from_ms), to=iso(span.to_ms), by=by.value,
                     rows=[Row(group=str(row[0]), **figures(row[1:])) for row in rows])

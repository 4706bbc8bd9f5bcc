"""Rollups of the closed windows per minute, hour and day, recomputed, never added to.

After the sink has stored a batch of stats rows it marks the minutes their windows start in
(`Pending`); those minutes are recomputed from `usage_stats FINAL`, then the hours holding
them from `usage_rollup_1m FINAL`, then the days from `usage_rollup_1h FINAL`, each an
`INSERT … SELECT … GROUP BY` in the engine (`refresh`, one level at a time). A bucket's new
row replaces its old one (ReplacingMergeTree(computed_at)), so a window the pipeline replays
after a crash, which replaced its twin in `usage_stats`, recomputes the bucket to the same
figures: a materialized view adding each inserted window would count it twice.

Each rollup row holds sums (windows, requests, outcomes, latency_sum_ms, tokens, cost), the
largest latency, and the merged latency sketch (core/sketch.py: the bins' counts added), so a
range's percentiles are read from bins, never averaged. Token sums saturate at 2**64 - 1 as
the windows' own do. A window belongs to the bucket of its start (windows divide a minute).

Each level has its own pace. A recompute reads its whole bucket (an hour reads its 60
minutes, a day its 24 hours) for every active key, so the sink recomputes minutes at most
every two seconds, hours once a minute and days once every ten minutes (`INTERVALS_S`), at
the sink's first batch or snapshot after the interval: with 10,000 active keys
an hour's recompute is the costliest statement, and its lag is small beside an hour. The
buckets waiting at each level are part of the sink's snapshot (`Pending.state`), so a crash
loses none: what came after the snapshot is replayed, and its windows mark their buckets
again. A clean stop recomputes everything waiting.

What is recomputed is every (user, service) bucket of the waiting time ranges, not only the
touched keys: recomputing an untouched bucket writes the figures it already had, and a
batch's windows share a few minutes (those one watermark step closes), in which most active
keys have windows anyway. So only two integers per range travel, as server-side parameters:
passing thousands of keys costs clickhouse-connect more Python time (it escapes every
character) than the recompute costs the engine, and a time range prunes the sorting key well
once keys have many windows (a granule then holds one key's narrow time span).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from core.clock import to_ms

MINUTE_S = 60
HOUR_S = 3600
DAY_S = 86_400
LEVEL_SECONDS = (MINUTE_S, HOUR_S, DAY_S)
# At most how often each level is recomputed (s): minutes every two seconds (a backlog closes
# windows batch after batch: their minutes are recomputed together), hours once a minute,
# days once every ten minutes.
INTERVALS_S = (2.0, 60.0, 600.0)
PENDING_MAX = 100_000  # buckets a level keeps waiting after a failed recompute

ROLLUP_TABLES = ("usage_rollup_1m", "usage_rollup_1h", "usage_rollup_1d")

_COLUMNS = (
    "user_id, service, bucket_start, windows, requests, successes, client_errors, "
    "server_errors, latency_sum_ms, latency_max_ms, latency_bins, latency_bin_counts, "
    "tokens_in, tokens_out, cost_usd, computed_at"
)


def _saturating_sum(column: str) -> str:
    """A UInt64 sum that stops at 2**64 - 1 instead of wrapping."""
    return f"toUInt64(least(sum(toUInt128({column})), toUInt128(18446744073709551615)))"


# The merged sketch of a group's rows: their bins and counts concatenated, sorted by bin, and
# each run of one bin summed (running sums at the run's end, less the previous run's). Equal
# to `sumMap(latency_bins, latency_bin_counts)`, in array functions: about twice as fast here,
# since sumMap keeps a tree per group and a recompute has a group per active key. Inline
# aliases, so that the two columns share the work without adding a column of their own.
_SKETCH_BINS = (
    "arrayFilter((k, l) -> l, arrayMap(t -> t.1, arraySort(arrayZip("
    "groupArrayArray(latency_bins), arrayMap(c -> toUInt64(c), "
    "groupArrayArray(latency_bin_counts)))) AS z) AS ks, "
    "arrayMap(i -> i = length(ks) OR ks[i + 1] != ks[i], arrayEnumerate(ks)) AS last)"
)
_SKETCH_COUNTS = (
    "arrayMap((e, i) -> e - if(i = 1, 0, ends[i - 1]), "
    "arrayFilter((s, l) -> l, arrayCumSum(arrayMap(t -> t.2, z)), last) AS ends, "
    "arrayEnumerate(ends))"
)


def _recompute(
    database: str, target: str, source: str, start: str, time_column: str, windows: str
) -> str:
    """INSERT every bucket of `target` in [{lo}, {hi}) (epoch seconds, bucket-aligned),
    recomputed from `source` FINAL, where `start` is the bucket of a source row, which starts
    at `time_column`."""
    return f"""
INSERT INTO {database}.{target} ({_COLUMNS})
SELECT
    user_id,
    service,
    {start} AS bucket,
    {windows},
    sum(requests),
    sum(successes),
    sum(client_errors),
    sum(server_errors),
    sum(latency_sum_ms),
    max(latency_max_ms),
    {_SKETCH_BINS},
    {_SKETCH_COUNTS},
    {_saturating_sum("tokens_in")},
    {_saturating_sum("tokens_out")},
    sum(cost_usd),
    now64(3)
FROM {database}.{source} FINAL
WHERE {time_column} >= toDateTime({{lo:UInt32}}, 'UTC')
  AND {time_column} < toDateTime({{hi:UInt32}}, 'UTC')
GROUP BY user_id, service, bucket
"""


def statements(database: str) -> list[tuple[str, int]]:
    """The three recomputations, finest first, with each one's bucket length in seconds."""
    return [
        (_recompute(database, "usage_rollup_1m", "usage_stats",
                    "toStartOfMinute(window_start)", "window_start", "count()"), MINUTE_S),
        (_recompute(database, "usage_rollup_1h", "usage_rollup_1m",
                    "toStartOfHour(bucket_start)", "bucket_start", "sum(windows)"), HOUR_S),
        (_recompute(database, "usage_rollup_1d", "usage_rollup_1h",
                    "toStartOfDay(bucket_start)", "bucket_start", "sum(windows)"), DAY_S),
    ]


def minutes_of(window_starts: Iterable[datetime]) -> set[int]:
    """The minutes (epoch seconds) that windows starting at `window_starts` fall in."""
    return {to_ms(start) // 60_000 * MINUTE_S for start in window_starts}


def ranges(buckets: Iterable[int], length: int) -> list[tuple[int, int]]:
    """Runs of consecutive buckets as [lo, hi) in epoch seconds: a batch's few minutes are
    one run; buckets far apart (a failed refresh's, then today's) are recomputed apart."""
    runs: list[tuple[int, int]] = []
    for start in sorted(buckets):
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], start + length)
        else:
            runs.append((start, start + length))
    return runs


def refresh(client: Client, database: str, level: int, buckets: Iterable[int],
            settings: dict[str, Any] | None = None) -> None:
    """Recompute the given buckets of one level (0: minutes, 1: hours, 2: days).

    Idempotent: run twice, or after a replay, it writes the same figures (newer rows that
    replace the older)."""
    sql, length = statements(database)[level]
    for lo, hi in ranges(buckets, length):
        client.command(sql, parameters={"lo": lo, "hi": hi}, settings=settings)


PendingState = tuple[list[int], list[int], list[int]]


class Pending:
    """The buckets of each level waiting for a recompute, and when each level last ran.

    Minutes are marked by stored windows; a recomputed level marks the buckets holding its
    buckets one level up. `state()` is what the sink's snapshot keeps."""

    def __init__(self, state: PendingState | None = None) -> None:
        self.buckets: list[set[int]] = [set(level) for level in state] if state else [
            set(), set(), set()]
        self.last_run = [0.0] * len(LEVEL_SECONDS)

    def mark(self, minutes: Iterable[int]) -> None:
        self.buckets[0].update(minutes)

    def due(self, level: int, now: float, intervals: tuple[float, ...], force: bool
            ) -> set[int]:
        """The level's waiting buckets if it is time to recompute them (or `force`)."""
        if self.buckets[level] and (force or now - self.last_run[level] >= intervals[level]):
            return set(self.buckets[level])
        return set()

    def done(self, level: int, buckets: set[int], now: float) -> None:
        """`buckets` were recomputed: the buckets holding them one level up now wait."""
        self.buckets[level] -= buckets
        self.last_run[level] = now
        if level + 1 < len(LEVEL_SECONDS):
            up = LEVEL_SECONDS[level + 1]
            self.buckets[level + 1].update(start // up * up for start in buckets)

    def failed(self, level: int, now: float) -> None:
        """The level stays waiting (bounded: the newest buckets) until its next turn."""
        self.buckets[level] = set(sorted(self.buckets[level])[-PENDING_MAX:])
        self.last_run[level] = now

    def state(self) -> PendingState:
        minutes, hours, days = (sorted(level) for level in self.buckets)
        return minutes, hours, days

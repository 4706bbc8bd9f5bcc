"""A mergeable latency sketch: log-bucketed counts (DDSketch's mapping), exact to ±ALPHA.

Each closed window carries its latencies as bins: bin `k` counts the values in
(GAMMA**(k-1), GAMMA**k], with GAMMA = (1 + ALPHA) / (1 - ALPHA); a zero latency has its own
bin, ZERO_BIN. Two sketches merge by adding counts bin by bin (ClickHouse: `sumMap`), so a
percentile over any range of windows is read from the merged bins, never averaged from the
windows' own percentiles, and stays the same after a replayed window replaces its twin.

Reading the q-quantile by nearest rank (the smallest value with at least q of the data at or
below it) returns the representative of the bin holding that value, 2·GAMMA**k / (GAMMA + 1),
whose relative error is at most ALPHA = 0.5 % for any value ≥ MIN_MS (tests/unit/test_sketch.py
checks this against the exact nearest-rank value over raw events). Latencies below MIN_MS
(one nanosecond) share MIN_MS's bin. A window of n events with spread-out latencies keeps
about 230 bins per decade of spread at most, and a typical 10 s window a few dozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

ALPHA = 0.005  # the relative error bound of a quantile read from the bins
GAMMA = (1 + ALPHA) / (1 - ALPHA)
LOG_GAMMA = math.log(GAMMA)
MIN_MS = 1e-6  # latencies below one nanosecond share its bin
ZERO_BIN = -32768  # Int16's minimum: the bin of latency 0 (the others lie in about ±2000)
_MIN_BIN = math.ceil(math.log(MIN_MS) / LOG_GAMMA)

# The same mapping in ClickHouse SQL, for sketches computed from raw events (`latency_ms`).
SQL_BIN = (
    f"if(latency_ms <= 0, {ZERO_BIN}, "
    f"toInt16(ceil(log(greatest(latency_ms, {MIN_MS!r})) / {LOG_GAMMA!r})))"
)


def bin_of(latency_ms: float) -> int:
    """The bin holding `latency_ms`."""
    if latency_ms <= 0:
        return ZERO_BIN
    if latency_ms <= MIN_MS:
        return _MIN_BIN
    return math.ceil(math.log(latency_ms) / LOG_GAMMA)


def value_of(key: int) -> float:
    """The representative of bin `key`: within ALPHA of every value the bin holds."""
    if key == ZERO_BIN:
        return 0.0
    return 2 * GAMMA**key / (GAMMA + 1)


def bins_of_sorted(latencies: Sequence[float]) -> tuple[list[int], list[int]]:
    """The bins and counts of latencies given in ascending order (as a window has them at
    close): one pass, bins ascending."""
    keys: list[int] = []
    counts: list[int] = []
    last = None
    for latency in latencies:
        key = bin_of(latency)
        if key == last:
            counts[-1] += 1
        else:
            keys.append(key)
            counts.append(1)
            last = key
    return keys, counts


def merge(sketches: Iterable[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int]]:
    """Sketches added bin by bin; bins ascending."""
    total: dict[int, int] = {}
    for keys, counts in sketches:
        for key, count in zip(keys, counts, strict=True):
            total[key] = total.get(key, 0) + count
    ordered = sorted(total)
    return ordered, [total[key] for key in ordered]


def quantile(keys: Sequence[int], counts: Sequence[int], q: float,
             max_ms: float | None = None) -> float | None:
    """The nearest-rank q-quantile read from bins in ascending order (None when empty).
    `max_ms`, the largest value seen, caps the answer: it is exact for q = 1."""
    n = sum(counts)
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    if rank >= n and max_ms is not None:
        return max_ms  # the largest value: known exactly (a bin's representative may be below)
    seen = 0
    for key, count in zip(keys, counts, strict=True):
        seen += count
        if seen >= rank:
            value = value_of(key)
            return min(value, max_ms) if max_ms is not None else value
    return value_of(keys[-1])  # unreachable: the counts sum to n

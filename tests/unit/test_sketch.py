"""The latency sketch's error bound, against the exact nearest-rank value over raw latencies.

The bound shown: a quantile read from merged window sketches is within ALPHA = 0.5 % (plus
float slack, below) of the exact nearest-rank value over the raw latencies, for any split of
the latencies into windows; twice as tight as the 1 % the analytics promise. Below MIN_MS
(a nanosecond) the error is absolute, at most (1 + ALPHA) · MIN_MS, and zero stays zero.

ClickHouse computes the same bins from raw events with core.sketch.SQL_BIN: the same bin as
`bin_of` for every value, except possibly the adjacent bin for a value within float
rounding of a bin boundary GAMMA**k (the engine's `log` and Python's differ in the last
bit). Either bin's representative is within ALPHA of such a value, so the bound holds too.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hypothesis import given
from hypothesis import strategies as st

from core.sketch import (
    ALPHA,
    GAMMA,
    LOG_GAMMA,
    MIN_MS,
    SQL_BIN,
    ZERO_BIN,
    bin_of,
    bins_of_sorted,
    merge,
    quantile,
    value_of,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

# value_of computes GAMMA**k with k up to about ±3,000: a few hundred ulps of relative error
# at most, far below this.
FLOAT_SLACK = 1e-9
BOUND = ALPHA + FLOAT_SLACK
MAX_LATENCY_MS = 3_600_000.0  # the schema's bound (an hour)


def test_the_bound_is_inside_the_promise() -> None:
    assert BOUND < 0.01


def nearest_rank(ordered: list[float], q: float) -> float:
    """The exact q-quantile over raw values: the smallest with at least q of them ≤ it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def assert_within_bound(got: float | None, exact: float) -> None:
    assert got is not None
    if exact == 0:
        assert got == 0
    elif exact < MIN_MS:
        assert abs(got - exact) <= (1 + ALPHA) * MIN_MS
    else:
        assert abs(got - exact) <= BOUND * exact, (got, exact, abs(got - exact) / exact)


def windows_of(values: list[float], cuts: list[int]) -> Iterator[list[float]]:
    edges = [0, *sorted(cuts), len(values)]
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            yield values[lo:hi]


latencies = st.one_of(
    st.just(0.0),
    st.floats(min_value=1e-12, max_value=1e-3),  # tiny, some below MIN_MS
    st.floats(min_value=1e-3, max_value=MAX_LATENCY_MS),
    st.just(MAX_LATENCY_MS),
    st.integers(-2000, 2000).map(lambda k: GAMMA**k),  # bin boundaries
)


@given(data=st.data())
def test_merged_window_sketches_read_quantiles_within_the_bound(data: st.DataObject) -> None:
    pool = data.draw(st.lists(latencies, min_size=1, max_size=40), label="distinct latencies")
    values = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=500),
                       label="latencies (many duplicates)")
    cuts = data.draw(st.lists(st.integers(0, len(values)), max_size=12), label="window cuts")
    # Each window as the pipeline closes it: its latencies sorted, then binned.
    sketches = [bins_of_sorted(sorted(window)) for window in windows_of(values, cuts)]
    keys, counts = merge(sketches)
    assert sum(counts) == len(values)
    largest = max(values)  # the windows' latency_max_ms, merged with max()
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99, data.draw(st.floats(0, 1), label="q")):
        assert_within_bound(quantile(keys, counts, q, largest), nearest_rank(ordered, q))
    assert quantile(keys, counts, 1.0, largest) == largest  # the maximum is exact


def test_a_day_of_ten_second_windows_reads_the_same_as_its_raw_latencies() -> None:
    rng = random.Random(12)
    values = [min(rng.lognormvariate(4, 1.5), MAX_LATENCY_MS) for _ in range(50_000)]
    values += [0.0] * 100 + [MAX_LATENCY_MS] * 10
    rng.shuffle(values)
    sketches = [bins_of_sorted(sorted(values[i:i + 200])) for i in range(0, len(values), 200)]
    keys, counts = merge(sketches)
    ordered = sorted(values)
    for q in (0.001, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999):
        assert_within_bound(quantile(keys, counts, q, ordered[-1]), nearest_rank(ordered, q))


def test_an_empty_sketch_has_no_quantile() -> None:
    assert quantile([], [], 0.5) is None
    assert value_of(ZERO_BIN) == 0.0 and bin_of(0.0) == ZERO_BIN


def sample_for_sql() -> list[float]:
    rng = random.Random(8)
    values = [0.0, 1e-12, MIN_MS, 1.0, MAX_LATENCY_MS]
    values += [rng.uniform(0, MAX_LATENCY_MS) for _ in range(3000)]
    values += [math.exp(rng.uniform(math.log(1e-7), math.log(MAX_LATENCY_MS)))
               for _ in range(3000)]
    for k in range(-2800, 3000, 7):  # boundaries and their float neighbours
        edge = GAMMA**k
        values += [math.nextafter(edge, 0.0), edge, math.nextafter(edge, math.inf)]
    return values


def test_clickhouse_bins_raw_latencies_as_bin_of_does(clickhouse_engine: Client) -> None:
    values = sample_for_sql()
    rows = clickhouse_engine.query(
        f"SELECT latency_ms, {SQL_BIN} FROM "
        "(SELECT arrayJoin({values:Array(Float64)}) AS latency_ms)",
        parameters={"values": values},
    ).result_rows
    assert [row[0] for row in rows] == values  # the values arrived bit for bit
    adjacent = 0
    for value, sql_bin in rows:
        if sql_bin == bin_of(value):
            continue
        # Only the neighbouring bin, and only on a boundary (within float rounding).
        position = math.log(value) / LOG_GAMMA
        assert abs(sql_bin - bin_of(value)) == 1, value
        assert abs(position - round(position)) < 1e-9, value
        adjacent += 1
    assert adjacent < len(values) // 100  # rare: a boundary hit to the last bit

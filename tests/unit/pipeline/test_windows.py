"""Stats math, exact percentiles, saturating sums, window assignment and the watermark, with
no clock at all (window assignment and the watermark's per-event rule through the
processor's loop, their one implementation)."""

from __future__ import annotations

import math
import random

import msgspec
import pytest

from core.clock import to_ms
from core.sketch import ZERO_BIN, bin_of
from pipeline.processor import ProcessorConfig
from pipeline.windows import (
    NEG_INF,
    UINT64_MAX,
    Watermark,
    WindowAcc,
    close_window,
    nearest_rank,
)
from schemas.events import UsageEvent
from tests.unit.pipeline.support import Driver, T, event


def call(
    status: int,
    latency: float,
    tokens_in: int | None = None,
    tokens_out: int | None = None,
    cost: float | None = None,
) -> UsageEvent:
    return UsageEvent(event_id="e", ts=0, user_id="u", api_key_id="k", service="openai",
                      status_code=status, latency_ms=latency, tokens_in=tokens_in,
                      tokens_out=tokens_out, cost_usd=cost)


def reference_quantile(values: list[float], q: float) -> float:
    """Smallest observed x with at least a q share of the data ≤ x (nearest rank)."""
    n = len(values)
    for x in sorted(values):
        if sum(1 for v in values if v <= x) >= q * n:
            return x
    raise AssertionError


def samples(kind: str, rng: random.Random) -> list[float]:
    if kind == "lognormal":
        return [rng.lognormvariate(4, 1) for _ in range(2000)]
    if kind == "bimodal":
        return [
            rng.gauss(40, 5) if rng.random() < 0.8 else rng.gauss(2000, 100) for _ in range(2000)
        ]
    if kind == "constant":
        return [123.0] * 500
    if kind == "tiny":
        return [5.0, 1.0, 3.0]
    if kind == "single":
        return [42.0]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["lognormal", "bimodal", "constant", "tiny", "single"])
@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_percentiles_are_exact(kind: str, q: float) -> None:
    values = [abs(v) for v in samples(kind, random.Random(7))]
    acc = WindowAcc()
    for v in values:
        acc.add(call(200, v))
    stats = close_window("u", "openai", 0, 10_000, acc)
    got = {0.5: stats.latency_p50_ms, 0.95: stats.latency_p95_ms, 0.99: stats.latency_p99_ms}[q]
    assert got == reference_quantile(values, q)  # exact: 0 % error, well inside 1 %
    assert stats.latency_max_ms == max(values)
    assert math.isclose(stats.latency_avg_ms, sum(values) / len(values))


def test_stats_record_fields() -> None:
    acc = WindowAcc()
    for status, latency, tin, tout, cost in [
        (200, 10.0, 5, 7, 0.5),
        (201, 20.0, None, 3, None),
        (404, 30.0, 1, None, 0.25),
        (429, 40.0, None, None, None),
        (500, 50.0, None, None, None),
    ]:
        acc.add(call(status, latency, tin, tout, cost))
    stats = close_window("u1", "openai", 1_700_000_000_000, 10_000, acc)
    assert (stats.requests, stats.successes, stats.client_errors, stats.server_errors) == (
        5,
        2,
        2,
        1,
    )
    assert (stats.success_rate, stats.error_rate, stats.server_error_rate) == (0.4, 0.6, 0.2)
    assert (stats.tokens_in, stats.tokens_out, stats.cost_usd) == (6, 10, 0.75)
    assert stats.window_seconds == 10
    assert stats.window_start.timestamp() == 1_700_000_000
    assert stats.window_end.timestamp() == 1_700_000_010
    assert stats.window_start.utcoffset() is not None
    assert (stats.latency_p50_ms, stats.latency_max_ms) == (30.0, 50.0)
    # The mergeable part: the exact sum, and one bin per distinct latency here (they lie
    # further apart than a bin's width), ascending, each counted once.
    assert stats.latency_sum_ms == 150.0
    assert stats.latency_bins == [bin_of(v) for v in (10.0, 20.0, 30.0, 40.0, 50.0)]
    assert stats.latency_bin_counts == [1, 1, 1, 1, 1]


def test_the_sketch_counts_every_latency_once() -> None:
    values = [0.0, 0.0, 1e-9, 12.5, 12.5, 12.5001, 3_600_000.0, 7.0]
    acc = WindowAcc()
    for v in values:
        acc.add(call(200, v))
    stats = close_window("u", "openai", 0, 10_000, acc)
    assert stats.latency_bins == sorted({bin_of(v) for v in values})
    assert stats.latency_bin_counts == [sum(1 for v in values if bin_of(v) == key)
                                        for key in stats.latency_bins]
    assert sum(stats.latency_bin_counts) == stats.requests == len(values)
    assert stats.latency_bins[0] == ZERO_BIN and stats.latency_bin_counts[0] == 2


@pytest.mark.parametrize(
    ("ts", "start"),
    [
        (T, T),  # exactly on a boundary: that window
        (T + 9_999, T),  # last millisecond of it
        (T + 10_000, T + 10_000),  # the next window starts at its end
    ],
)
def test_window_assignment_at_boundaries(ts: int, start: int) -> None:
    driver = Driver(ProcessorConfig(window_seconds=10, allowed_lateness_seconds=0))
    driver.send(event("e", ts))
    (stats,) = driver.send(event("far", T + 60_000)).stats
    assert to_ms(stats.window_start) == start and to_ms(stats.window_end) == start + 10_000


def test_nearest_rank_small() -> None:
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0


def test_watermark_follows_event_time() -> None:
    driver = Driver(ProcessorConfig(allowed_lateness_seconds=5))
    watermark = driver.processor.watermark
    assert watermark.value == NEG_INF
    driver.send(event("a", T + 10_000))
    assert (watermark.value, watermark.max_event_ms) == (T + 5_000, T + 10_000)
    driver.send(event("b", T + 8_000))  # out of order: never moves back
    assert watermark.value == T + 5_000


def test_watermark_advances_with_wall_time_only_while_caught_up() -> None:
    wm = Watermark(lateness_ms=5000)
    wm.observe_wall(1_000, caught_up=False, run_id="a")
    wm.value, wm.max_event_ms = 95_000, 100_000  # as the loop leaves them
    wm.observe_wall(2_000, caught_up=False, run_id="a")  # backlog: wall time does not count
    assert wm.value == 95_000
    wm.observe_wall(3_000, caught_up=True, run_id="a")  # just caught up: starts counting
    assert wm.value == 95_000
    wm.observe_wall(4_500, caught_up=True, run_id="a")  # idle 1.5 s
    assert wm.value == 96_500
    wm.observe_wall(9_000, caught_up=False, run_id="a")  # a backlog again
    assert wm.value == 96_500


def test_watermark_ignores_downtime_across_a_resume() -> None:
    wm = Watermark(lateness_ms=5000)
    wm.value, wm.max_event_ms = 95_000, 100_000
    wm.observe_wall(1_000, caught_up=True, run_id="before-crash")
    restored = Watermark.from_state(5000, wm.state())
    restored.observe_wall(3_600_000, caught_up=True, run_id="after-restart")  # an hour later
    assert restored.value == 95_000  # the backlog after a restart is not "late"
    restored.observe_wall(3_601_000, caught_up=True, run_id="after-restart")
    assert restored.value == 96_000


def test_bound_brings_a_future_watermark_back_to_wall_time_plus_skew() -> None:
    wm = Watermark(lateness_ms=5000)
    wm.value, wm.max_event_ms = 4_070_908_795_000, 4_070_908_800_000  # a 2099 event's
    wm.bound(T + 300_000)
    assert (wm.value, wm.max_event_ms) == (T + 295_000, T + 300_000)
    wm.bound(T + 400_000)  # a later bound never moves it forward
    assert (wm.value, wm.max_event_ms) == (T + 295_000, T + 300_000)
    empty = Watermark(lateness_ms=5000)
    empty.bound(T)
    assert (empty.value, empty.max_event_ms) == (NEG_INF, NEG_INF)


def test_window_sums_saturate_at_uint64_max() -> None:
    acc = WindowAcc()
    for _ in range(2049):  # 2,049 × 2**53 > 2**64 - 1
        acc.add(call(200, 1.0, tokens_in=2**53, tokens_out=2**53))
    stats = close_window("u", "s", 0, 10_000, acc)
    assert stats.tokens_in == stats.tokens_out == UINT64_MAX == 2**64 - 1
    # The same value on Kafka (the JSON) as in ClickHouse's UInt64 column.
    assert msgspec.json.decode(msgspec.json.encode(stats))["tokens_in"] == 2**64 - 1

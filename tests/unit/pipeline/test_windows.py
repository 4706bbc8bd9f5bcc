"""Stats math, exact percentiles, window assignment and the watermark, with no clock at all."""

from __future__ import annotations

import math
import pickle
import random

import pytest

from pipeline.windows import NEG_INF, Watermark, WindowAcc, close_window, nearest_rank, window_start
from schemas.events import UsageEvent


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


@pytest.mark.parametrize(
    ("ts", "start"),
    [
        (1_700_000_000_000, 1_700_000_000_000),  # exactly on a boundary: that window
        (1_700_000_009_999, 1_700_000_000_000),  # last millisecond of it
        (1_700_000_010_000, 1_700_000_010_000),  # the next window starts at its end
        (0, 0),
    ],
)
def test_window_assignment_at_boundaries(ts: int, start: int) -> None:
    assert window_start(ts, 10_000) == start


def test_nearest_rank_small() -> None:
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0


def test_watermark_follows_event_time() -> None:
    wm = Watermark(lateness_ms=5000)
    assert wm.value == NEG_INF
    wm.observe_event(100_000)
    assert wm.value == 95_000
    wm.observe_event(90_000)  # out of order: never moves back
    assert wm.value == 95_000


def test_watermark_advances_with_wall_time_only_while_caught_up() -> None:
    wm = Watermark(lateness_ms=5000)
    wm.observe_wall(1_000, caught_up=False, run_id="a")
    wm.observe_event(100_000)
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
    wm.observe_event(100_000)
    wm.observe_wall(1_000, caught_up=True, run_id="before-crash")
    restored = pickle.loads(pickle.dumps(wm))
    restored.observe_wall(3_600_000, caught_up=True, run_id="after-restart")  # an hour later
    assert restored.value == 95_000  # the backlog after a restart is not "late"
    restored.observe_wall(3_601_000, caught_up=True, run_id="after-restart")
    assert restored.value == 96_000


def test_accumulators_from_keypulse_0_1_snapshots_close_the_same() -> None:
    acc = WindowAcc()
    for status, latency in [(200, 10.0), (404, 30.0), (503, 20.0), (201, 5.0)]:
        acc.add(call(status, latency, 2, 3, 0.5))
    old = WindowAcc.__new__(WindowAcc)  # the 0.1 layout: counts and running sums
    old.__setstate__((1, 2.0, acc.latencies, 30.0, 65.0, 1, 2, 8, 12))
    assert close_window("u", "s", 0, 10_000, old) == close_window("u", "s", 0, 10_000, acc)

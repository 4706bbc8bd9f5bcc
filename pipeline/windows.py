"""Event-time watermark and tumbling-window accumulators (DESIGN §2).

The watermark is the newest event time seen minus the allowed lateness. It advances with
wall time only while the partition is caught up (its consumer has no backlog), and only by
wall time that passed *in this run* while caught up: a crash, a restart or a stalled sink
therefore never turns a backlog into late events, yet a quiet key's last window still
closes. Windows are aligned to the Unix epoch and close when the watermark passes their end.
No event time counts past wall time + the clock-skew bound (`Watermark.bound`), so one event
dated 2099 cannot make the rest of its partition late.

The rules themselves (window assignment, lateness, the watermark's step per event) live in
one place, the processor's per-event loop; `tests/unit/pipeline/oracle.py` restates them
plainly and a property test holds the two together.

Percentiles are exact: each open window keeps its latencies in an `array('d')` (8 bytes per
event, only while the window is open) and sorts them once at close. At the event rates of one
(user, service) the sort is cheap, there is no error to bound, and values are real
observations (nearest-rank definition), which is what a user comparing against their own
logs expects. A window's own percentiles cannot be merged, though: at close the sorted
latencies also give the window's mergeable sketch (core/sketch.py, one pass, no state kept
while the window is open), from which a range's percentiles are read within ±0.5 %.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from datetime import UTC, datetime

from core.sketch import bins_of_sorted
from schemas.events import UsageEvent
from schemas.stats import StatsRecord

NEG_INF = -(2**62)
NO_WINDOW = 2**62  # a window start later than any: "no window" where a minimum is kept
UINT64_MAX = 2**64 - 1  # ClickHouse's UInt64: window sums saturate here rather than wrap


class Watermark:
    """The event-time watermark of one partition: state the processor's loop reads and writes.

    `value` is the watermark and `max_event_ms` the newest event time counted in a window.
    The loop copies both into locals once per batch and writes them back once at its end; per
    counted event it applies the rule `if ts > max_event_ms: max_event_ms = ts; value =
    max(value, ts - lateness_ms)`. Between batches, `observe_wall` advances it with wall time
    and `bound` holds it to wall time + the clock-skew bound.
    """

    __slots__ = ("caught_up", "last_wall_ms", "lateness_ms", "max_event_ms", "run_id", "value")

    def __init__(self, lateness_ms: int) -> None:
        self.lateness_ms = lateness_ms
        self.max_event_ms = NEG_INF
        self.value = NEG_INF
        self.last_wall_ms = 0
        self.caught_up = False
        self.run_id = ""

    def observe_wall(self, wall_ms: int, caught_up: bool, run_id: str) -> None:
        """Advance by the wall time that passed while caught up, within one run."""
        if (
            caught_up
            and self.caught_up
            and run_id == self.run_id
            and self.value != NEG_INF
            and wall_ms > self.last_wall_ms
        ):
            self.value += wall_ms - self.last_wall_ms
        self.last_wall_ms = wall_ms
        self.caught_up = caught_up
        self.run_id = run_id

    def bound(self, newest_ms: int) -> None:
        """No event time past `newest_ms` (the batch's wall time + the clock-skew bound).

        Admission keeps every counted event within it, and advancing with wall time keeps
        the bound; this brings back what came from elsewhere: a snapshot whose watermark a
        2099 event had moved (before admission existed), or a wall clock set back.
        """
        if self.max_event_ms > newest_ms:
            self.max_event_ms = newest_ms
        if self.value > newest_ms - self.lateness_ms:
            self.value = newest_ms - self.lateness_ms

    def state(self) -> tuple[int, int, int, bool, str]:
        """What a snapshot keeps (the lateness comes from the configuration)."""
        return (self.value, self.max_event_ms, self.last_wall_ms, self.caught_up, self.run_id)

    @classmethod
    def from_state(cls, lateness_ms: int, state: tuple[int, int, int, bool, str]) -> Watermark:
        watermark = cls(lateness_ms)
        (watermark.value, watermark.max_event_ms, watermark.last_wall_ms, watermark.caught_up,
         watermark.run_id) = state
        return watermark


AccState = tuple[float, "array[float]", "array[int]", int, int]


class WindowAcc:
    """What one (user_id, service, window) has seen so far.

    Adding an event is two appends (and the token and cost sums when present): everything
    else is computed once, at close, from the arrays (sorting them in C).
    """

    __slots__ = ("cost_usd", "latencies", "statuses", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.latencies = array("d")
        self.statuses = array("H")
        self.tokens_in = 0
        self.tokens_out = 0
        self.cost_usd = 0.0

    def add(self, event: UsageEvent) -> None:
        self.latencies.append(event.latency_ms)
        self.statuses.append(event.status_code)
        if event.tokens_in:
            self.tokens_in += event.tokens_in
        if event.tokens_out:
            self.tokens_out += event.tokens_out
        if event.cost_usd:
            self.cost_usd += event.cost_usd

    def state(self) -> AccState:
        """What a snapshot keeps: plain values (snapshots hold thousands of these)."""
        return (self.cost_usd, self.latencies, self.statuses, self.tokens_in, self.tokens_out)

    @classmethod
    def from_state(cls, state: AccState) -> WindowAcc:
        acc = cls.__new__(cls)
        (acc.cost_usd, acc.latencies, acc.statuses, acc.tokens_in, acc.tokens_out) = state
        return acc


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The q-quantile by nearest rank: the smallest value with at least q of the data ≤ it."""
    n = len(sorted_values)
    return sorted_values[max(0, math.ceil(q * n) - 1)]


def close_window(
    user_id: str,
    service: str,
    start_ms: int,
    window_ms: int,
    acc: WindowAcc,
    bounds: tuple[datetime, datetime] | None = None,
) -> StatsRecord:
    """The stats record of a closed window. `bounds` are its start and end as datetimes (the
    caller closing many windows of one start computes them once)."""
    requests = len(acc.latencies)
    latency_sum = sum(acc.latencies)  # in arrival order, as a running sum
    ordered = sorted(acc.latencies)
    bins, bin_counts = bins_of_sorted(ordered)
    statuses = sorted(acc.statuses)
    successes = bisect_left(statuses, 400)
    server_errors = requests - bisect_left(statuses, 500)
    client_errors = requests - successes - server_errors
    if bounds is None:
        bounds = window_bounds(start_ms, window_ms)
    return StatsRecord(
        user_id=user_id,
        service=service,
        window_start=bounds[0],
        window_end=bounds[1],
        window_seconds=window_ms // 1000,
        requests=requests,
        successes=successes,
        client_errors=client_errors,
        server_errors=server_errors,
        success_rate=successes / requests,
        error_rate=(client_errors + server_errors) / requests,
        server_error_rate=server_errors / requests,
        latency_avg_ms=latency_sum / requests,
        latency_p50_ms=nearest_rank(ordered, 0.50),
        latency_p95_ms=nearest_rank(ordered, 0.95),
        latency_p99_ms=nearest_rank(ordered, 0.99),
        latency_max_ms=ordered[-1],
        # Sums saturate: the same record goes to Kafka and to ClickHouse's UInt64 columns.
        tokens_in=min(acc.tokens_in, UINT64_MAX),
        tokens_out=min(acc.tokens_out, UINT64_MAX),
        cost_usd=round(acc.cost_usd, 9),
        latency_sum_ms=latency_sum,
        latency_bins=bins,
        latency_bin_counts=bin_counts,
    )


def window_bounds(start_ms: int, window_ms: int) -> tuple[datetime, datetime]:
    return (datetime.fromtimestamp(start_ms / 1000, tz=UTC),
            datetime.fromtimestamp((start_ms + window_ms) / 1000, tz=UTC))

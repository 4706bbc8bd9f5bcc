"""The pipeline kernel's rules, restated plainly: the reference for the processor's loop.

`pipeline.processor.PartitionProcessor._process` is the only implementation the pipeline
runs; it inlines every rule for speed. This module says the same rules the slow, obvious way
(no sentinels, no caches, no locals written back), one batch at a time, and
`test_oracle.py` feeds both the same random streams and requires the same verdicts. When a
rule changes, change it here too; if the two disagree, the property test says where.

The rules, per record of a poll batch, in this order:

1. A null value (a tombstone) is dead-lettered: `tombstone`.
2. Bytes that are not a valid event are dead-lettered with the schema's reason.
3. Admission: event time more than the clock-skew bound after the batch's wall time:
   `ts_in_future`; before wall time minus the raw events' retention: `ts_beyond_retention`.
4. Dedup: an (user, event_id) pair kept from before is a duplicate, and nothing else happens.
5. Window assignment: the window holding ts (windows align to the epoch). The event is late
   when that window ends at or before the watermark: it is written (late) and counted nowhere.
6. Service cap: an on-time event that would open a (user, service) pair in its window, for a
   user who already has `max_services_per_user` other services with open windows, is
   dead-lettered: `too_many_services`.
7. The event's id is kept (if its minute is kept, below), and an on-time event joins its
   window and may move the watermark: newest counted event time minus the lateness.

A dead-lettered event leaves no trace. Per batch, before its records: the watermark advances
by the wall time that passed while the partition stayed caught up within one run, and then
no time (newest event, watermark + lateness, dedup's newest time) may pass wall + skew.
After the records: dedup drops the minutes whose end is more than the horizon before its
newest time, then the oldest minutes while over the cap (keeping one). After each batch
(idle ticks too), every window ending at or before the watermark closes, in order of
(start, user, service).

Dedup keeps ids by minute of event time. A minute is opened for a new id only if its end is
within the horizon of dedup's newest time; a minute already open keeps taking ids until the
batch ends.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.sketch import bin_of
from pipeline.processor import ProcessorConfig
from schemas.events import InvalidEvent, UsageEvent, decode_event
from schemas.stats import StatsRecord

MINUTE_MS = 60_000
UINT64_MAX = 2**64 - 1
PROCESSOR_REASONS = ("tombstone", "ts_in_future", "ts_beyond_retention", "too_many_services")


def reason_kind(reason: str) -> str:
    """A processor reason is compared by its name (it goes on with details); a schema
    reason as a whole."""
    name = reason.split(":", maxsplit=1)[0]
    return name if name in PROCESSOR_REASONS else reason


@dataclass
class Verdicts:
    """What one batch produced."""

    stats: list[StatsRecord] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)  # (offset, reason kind)
    rows: list[tuple[int, bool]] = field(default_factory=list)  # (offset, late) written
    duplicates: int = 0


class Oracle:
    def __init__(self, config: ProcessorConfig) -> None:
        self.window_ms = config.window_seconds * 1000
        self.lateness_ms = config.allowed_lateness_seconds * 1000
        self.horizon_ms = config.dedup_horizon_seconds * 1000
        self.skew_ms = config.max_clock_skew_seconds * 1000
        self.retention_ms = config.events_ttl_days * 86_400_000
        self.max_services = config.max_services_per_user
        self.dedup_cap = math.ceil(config.dedup_max_ids / config.partitions)
        self.kept: dict[str, int] = {}  # "user\x1fevent_id" → the minute (start) it is kept in
        self.dedup_newest = 0  # newest event time of a kept id
        self.newest_event: int | None = None  # newest event time counted in a window
        self.watermark: int | None = None
        self.run = 0
        self.last_wall: tuple[int, bool, int] | None = None  # (wall, caught up, run)
        self.open: dict[tuple[int, str, str], list[UsageEvent]] = {}  # (start, user, service)
        self.late = 0

    def restart(self) -> None:
        """A resume from a snapshot: a new run, whose wall time is not compared with the old."""
        self.run += 1

    def batch(self, records: list[tuple[int, bytes | None]], wall_ms: int,
              caught_up: bool) -> Verdicts:
        out = Verdicts()
        self._observe_wall(wall_ms, caught_up)
        newest_allowed = wall_ms + self.skew_ms
        if self.newest_event is not None:
            self.newest_event = min(self.newest_event, newest_allowed)
        if self.watermark is not None:
            self.watermark = min(self.watermark, newest_allowed - self.lateness_ms)
        self.dedup_newest = min(self.dedup_newest, newest_allowed)
        for offset, value in records:
            self._record(offset, value, wall_ms, out)
        if records:
            self._expire_ids()
        self._close_windows(out)
        return out

    # -- the rules ---------------------------------------------------------------------

    def _observe_wall(self, wall_ms: int, caught_up: bool) -> None:
        if self.last_wall is not None and self.watermark is not None:
            last_wall, was_caught_up, run = self.last_wall
            if caught_up and was_caught_up and run == self.run and wall_ms > last_wall:
                self.watermark += wall_ms - last_wall
        self.last_wall = (wall_ms, caught_up, self.run)

    def _record(self, offset: int, value: bytes | None, wall_ms: int, out: Verdicts) -> None:
        if value is None:
            out.dead.append((offset, "tombstone"))
            return
        try:
            event = decode_event(value)
        except InvalidEvent as exc:
            out.dead.append((offset, exc.reason))
            return
        ts = event.ts_ms
        if ts > wall_ms + self.skew_ms:
            out.dead.append((offset, "ts_in_future"))
            return
        if ts < wall_ms - self.retention_ms:
            out.dead.append((offset, "ts_beyond_retention"))
            return
        id_key = f"{event.user_id}\x1f{event.event_id}"
        if id_key in self.kept:
            out.duplicates += 1
            return
        start = (ts // self.window_ms) * self.window_ms
        late = self.watermark is not None and start + self.window_ms <= self.watermark
        window = (start, event.user_id, event.service)
        if not late and window not in self.open:
            services = {s for (_, user, s) in self.open if user == event.user_id}
            if event.service not in services and len(services) >= self.max_services:
                out.dead.append((offset, "too_many_services"))
                return
        self._keep_id(id_key, ts)
        if late:
            self.late += 1
        else:
            self.open.setdefault(window, []).append(event)
            if self.newest_event is None or ts > self.newest_event:
                self.newest_event = ts
                if self.watermark is None or ts - self.lateness_ms > self.watermark:
                    self.watermark = ts - self.lateness_ms
        out.rows.append((offset, late))

    def _keep_id(self, id_key: str, ts: int) -> None:
        minute = (ts // MINUTE_MS) * MINUTE_MS
        already_open = minute in self.kept.values()
        within_horizon = minute + MINUTE_MS + self.horizon_ms >= self.dedup_newest
        if already_open or (self.horizon_ms > 0 and within_horizon):
            self.kept[id_key] = minute
            self.dedup_newest = max(self.dedup_newest, ts)

    def _expire_ids(self) -> None:
        for minute in sorted(set(self.kept.values())):
            if minute + MINUTE_MS < self.dedup_newest - self.horizon_ms:
                self._drop_minute(minute)
        while len(self.kept) > self.dedup_cap and len(set(self.kept.values())) > 1:
            self._drop_minute(min(self.kept.values()))

    def _drop_minute(self, minute: int) -> None:
        self.kept = {k: m for k, m in self.kept.items() if m != minute}

    def _close_windows(self, out: Verdicts) -> None:
        if self.watermark is None:
            return
        for window in sorted(self.open):
            start, user, service = window
            if start + self.window_ms <= self.watermark:
                out.stats.append(self._stats(user, service, start, self.open.pop(window)))

    # -- stats -----------------------------------------------------------------------------

    def _stats(self, user: str, service: str, start: int, events: list[UsageEvent]
               ) -> StatsRecord:
        n = len(events)
        latencies = [e.latency_ms for e in events]
        successes = sum(1 for e in events if e.status_code < 400)  # 1xx, 2xx, 3xx
        client = sum(1 for e in events if 400 <= e.status_code < 500)
        server = sum(1 for e in events if e.status_code >= 500)
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        sketch = Counter(bin_of(latency) for latency in latencies)  # bin → how many
        return StatsRecord(
            user_id=user, service=service,
            window_start=epoch + timedelta(milliseconds=start),
            window_end=epoch + timedelta(milliseconds=start + self.window_ms),
            window_seconds=self.window_ms // 1000,
            requests=n, successes=successes, client_errors=client, server_errors=server,
            success_rate=successes / n, error_rate=(client + server) / n,
            server_error_rate=server / n,
            latency_avg_ms=sum(latencies) / n,
            latency_p50_ms=nearest_rank(latencies, 0.50),
            latency_p95_ms=nearest_rank(latencies, 0.95),
            latency_p99_ms=nearest_rank(latencies, 0.99),
            latency_max_ms=max(latencies),
            tokens_in=min(sum(e.tokens_in or 0 for e in events), UINT64_MAX),
            tokens_out=min(sum(e.tokens_out or 0 for e in events), UINT64_MAX),
            cost_usd=round(sum(e.cost_usd or 0.0 for e in events), 9),
            latency_sum_ms=sum(latencies),
            latency_bins=sorted(sketch),
            latency_bin_counts=[sketch[key] for key in sorted(sketch)],
        )


def nearest_rank(values: list[float], q: float) -> float:
    """The smallest observed value with at least a q share of the values at or below it."""
    for x in sorted(values):
        if sum(1 for v in values if v <= x) >= q * len(values):
            return x
    raise AssertionError

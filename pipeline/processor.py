"""Per-partition processing: decode → admit → dedup → watermark → windows → PartitionOutput.

A user's events share a Kafka partition (key = user_id), so all state of a user — dedup
ids, open windows, alert state — lives with that partition's processor, and one item per
poll batch crosses the dataflow instead of one per event. Processing is deterministic in
the partition's order and the batches' wall times: after a resume, replayed records produce
the same rows, the same late/dup/dead-letter verdicts and the same windows, so the
idempotent sinks converge.

The per-event loop in `PartitionProcessor._process` is the one implementation of the rules
(admission, dedup, watermark, window assignment, the service cap); `Deduplicator` and
`Watermark` are the state it works on. `tests/unit/pipeline/oracle.py` restates the rules
plainly, and a property test feeds both the same random streams.

Hostile input is dead-lettered, never fatal, and never starves other users (DESIGN §1):
a tombstone, an event more than the clock-skew bound ahead of the batch's wall time
(`ts_in_future`), one older than the raw events' retention (`ts_beyond_retention`), and a
user's service beyond `max_services_per_user` services with open windows
(`too_many_services`).

State: `snapshot()` writes plain data tagged `pipeline.state.STATE_VERSION`; a resume reads
any earlier release's snapshot through `pipeline.state.upgrade`.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bytewax.operators import StatefulBatchLogic
from msgspec.structs import astuple

from pipeline.dedup import BUCKET_MS, Deduplicator, IdLog
from pipeline.items import DeadLetter, EventRows, PartitionOutput, RuleUpdates, SourceBatch
from pipeline.metrics import METRICS, PipelineMetrics
from pipeline.rows import encode_row_into
from pipeline.state import STATE_VERSION, load_state, upgrade
from pipeline.windows import NEG_INF, NO_WINDOW, Watermark, WindowAcc, close_window, window_bounds
from schemas.events import InvalidEvent, decode_event, ts_bounds, ts_reason
from schemas.stats import StatsRecord

if TYPE_CHECKING:
    from pipeline.alerting.incidents import IncidentInput
    from schemas.alerts import Alert
    from schemas.notifications import Notification

logger = logging.getLogger(__name__)

RUN_ID = uuid.uuid4().hex  # one per process: wall time is trusted only within a run

# Dead-letter reasons of the processor (`keypulse.reason` starts with one of them; schema
# failures carry the field and rule instead, e.g. "ts: required field missing").
TOMBSTONE = "tombstone"
TOO_MANY_SERVICES = "too_many_services"


class WindowHook(Protocol):
    """Called with every batch of closed windows (the alert evaluator implements it)."""

    def on_control(self, item: Any) -> None: ...

    def take_signals(self) -> list[IncidentInput]: ...

    def on_windows(
        self, stats: list[StatsRecord], watermark_ms: int
    ) -> tuple[list[Alert], list[Notification]]: ...

    def snapshot(self) -> Any: ...


HookFactory = Callable[[Any], WindowHook]  # resumed hook state (or None) → hook


@dataclass(frozen=True)
class ProcessorConfig:
    window_seconds: int = 10
    allowed_lateness_seconds: int = 5
    dedup_horizon_seconds: int = 3600
    dedup_max_ids: int = 2_000_000  # in total, over `partitions` partitions
    dedup_dir: Path | None = None  # the id logs (pipeline.dedup.IdLog); None: in the snapshot
    partitions: int = 1  # of the events topic: each partition's dedup gets its share
    max_clock_skew_seconds: int = 300  # admission: no event further ahead of wall time
    events_ttl_days: int = 30  # admission: no event older (the raw events' retention)
    max_services_per_user: int = 100  # distinct services with open windows, per user

    @property
    def window_ms(self) -> int:
        return self.window_seconds * 1000

    @property
    def dedup_cap(self) -> int:
        """This partition's share of the total dedup bound."""
        return math.ceil(self.dedup_max_ids / max(self.partitions, 1))


class PartitionProcessor(StatefulBatchLogic[Any, PartitionOutput, bytes]):
    """State is snapshotted as pickled bytes: immutable, as Bytewax requires."""

    def __init__(
        self,
        config: ProcessorConfig,
        resume: bytes | None,
        hook_factory: HookFactory | None = None,
        metrics: PipelineMetrics = METRICS,
        run_id: str = RUN_ID,
    ) -> None:
        self.partition = -1  # Bytewax does not tell a builder its key: learnt from the items
        # The windows the last batch closed and the watermark then: the hook evaluates them at
        # the start of the next batch (or at EOF), once their stats are on their way.
        self.unevaluated: tuple[list[StatsRecord], int] | None = None
        self.config = config
        self.metrics = metrics
        self.run_id = run_id
        horizon_ms = config.dedup_horizon_seconds * 1000
        lateness_ms = config.allowed_lateness_seconds * 1000
        hook_state: Any = None
        if resume is None:
            self.watermark = Watermark(lateness_ms)
            self.dedup = Deduplicator(horizon_ms, config.dedup_cap)
            self.windows: dict[int, dict[tuple[str, str], WindowAcc]] = {}
        else:
            state = upgrade(load_state(resume))
            self.partition = state["partition"]
            self.watermark = Watermark.from_state(lateness_ms, state["watermark"])
            self.dedup = Deduplicator.restore(state["dedup"], horizon_ms, config.dedup_cap,
                                              self._id_log(self.partition))
            self.windows = {start: {key: WindowAcc.from_state(acc) for key, acc in accs.items()}
                            for start, accs in state["windows"].items()}
            hook_state = state["hook"]
            self.unevaluated = state["unevaluated"]
        # The service cap's books: how many open windows hold each (user, service), and how
        # many services each user has in open windows. Derived from the windows, so a resume
        # rebuilds them and a replay gives the same verdicts.
        self.open_pairs: dict[tuple[str, str], int] = {}
        self.user_services: dict[str, int] = {}
        for accs in self.windows.values():
            for pair in accs:
                self._count_pair(pair)
        # The hook (alerting) resumes from its own part of the snapshot.
        self.hook = hook_factory(hook_state) if hook_factory is not None else None

    # -- bytewax ---------------------------------------------------------------------------

    def on_batch(self, values: list[Any]) -> tuple[list[PartitionOutput], bool]:
        out = PartitionOutput.empty(self.partition)
        self._evaluate_closed(out)
        for item in values:
            if isinstance(item, SourceBatch):
                self.partition = item.partition
                self._process(item, out)
            elif isinstance(item, RuleUpdates) and self.hook is not None:
                for change in item.changes:
                    self.hook.on_control(change)
        self._close_ready(out)
        self.metrics.maybe_log()
        return [out], StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[PartitionOutput], bool]:
        out = PartitionOutput.empty(self.partition)
        self._evaluate_closed(out)
        return [out], StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        if self.dedup.log is None:
            self.dedup.log = self._id_log(self.partition)
        state = {
            "version": STATE_VERSION,
            "partition": self.partition,
            "watermark": self.watermark.state(),
            "dedup": self.dedup.snapshot(),
            "windows": {start: {key: acc.state() for key, acc in accs.items()}
                        for start, accs in self.windows.items()},
            "hook": self.hook.snapshot() if self.hook is not None else None,
            "unevaluated": self.unevaluated,
        }
        return pickle.dumps(state, protocol=5)

    def _count_pair(self, pair: tuple[str, str]) -> None:
        if pair in self.open_pairs:
            self.open_pairs[pair] += 1
        else:
            self.open_pairs[pair] = 1
            self.user_services[pair[0]] = self.user_services.get(pair[0], 0) + 1

    def open_services(self) -> dict[str, set[str]]:
        """Each user's services with open windows (what the cap counts)."""
        services: dict[str, set[str]] = {}
        for user_id, service in self.open_pairs:
            services.setdefault(user_id, set()).add(service)
        return services

    def _id_log(self, partition: int) -> IdLog | None:
        if self.config.dedup_dir is None or partition < 0:
            return None
        return IdLog(self.config.dedup_dir, partition)

    # -- work --------------------------------------------------------------------------------

    def _process(self, batch: SourceBatch, out: PartitionOutput) -> None:
        config = self.config
        wall_ms = batch.wall_ms  # the source's clock at poll time: no clock read per event
        oldest_ms, newest_ms = ts_bounds(  # admission (DESIGN §1), once per batch
            wall_ms, config.max_clock_skew_seconds, config.events_ttl_days)
        watermark = self.watermark
        watermark.observe_wall(wall_ms, batch.caught_up, self.run_id)
        watermark.bound(newest_ms)
        dedup = self.dedup
        dedup.bound(newest_ms)
        if not batch.records:
            return
        # The per-event loop is the dataflow's hot path: names are bound locally, the
        # watermark and dedup state is kept in locals written back once per batch, and each
        # event's row (pipeline.rows.EVENT_ROW_COLUMNS) is appended to the batch's buffer at
        # once, while the event is hot. Tuple concatenation builds the row faster than
        # unpacking into a display (RUF005). An event that is dead-lettered leaves no trace
        # in the state (no dedup id, no window).
        window_ms = config.window_ms
        windows = self.windows
        open_pairs, user_services = self.open_pairs, self.user_services
        max_services = config.max_services_per_user
        seen_ids = dedup.ids
        keep_id = seen_ids.add
        id_bucket, bucket_ids = NEG_INF, None
        dedup_max_ms = dedup.max_ts_ms
        buffer = bytearray()
        encode_into = encode_row_into
        end_row = buffer.append  # end_row(0x0A): each row ends with a newline
        dead_letters = out.dead_letters
        dead_before = len(dead_letters)
        partition = batch.partition
        ingested_ms = int(time.time() * 1000)
        lateness_ms = watermark.lateness_ms
        mark = watermark.value
        max_event_ms = watermark.max_event_ms
        duplicates = late = misrouted = 0
        accs_start = first_window = NO_WINDOW
        accs: dict[tuple[str, str], WindowAcc] = {}
        for offset, key, value in batch.records:
            try:
                event = decode_event(value)  # type: ignore[arg-type]  # None: a TypeError
            except InvalidEvent as exc:
                dead_letters.append(DeadLetter(value, key, exc.reason, partition, offset))
                continue
            except TypeError:
                if value is not None:
                    raise
                dead_letters.append(DeadLetter(None, key, TOMBSTONE, partition, offset))
                continue
            user_id = event.user_id
            ts = event.ts
            ts_ms = ts if type(ts) is int else event.ts_ms
            if ts_ms > newest_ms or ts_ms < oldest_ms:
                dead_letters.append(DeadLetter(value, key, _ts_reason(ts_ms, wall_ms, config),
                                               partition, offset))
                continue
            id_key = f"{user_id}\x1f{event.event_id}"  # Deduplicator.ids
            if id_key in seen_ids:
                duplicates += 1
                continue
            start = ts_ms - ts_ms % window_ms
            on_time = start + window_ms > mark  # else late: its window has closed
            if on_time:
                if start != accs_start:  # events come roughly in time order: mostly the same
                    found = windows.get(start)
                    if found is None:
                        found = windows[start] = {}
                    accs, accs_start = found, start
                    if start < first_window:
                        first_window = start
                pair = (user_id, event.service)
                acc = accs.get(pair)
                if acc is None:  # once per (user, service, window)
                    windows_of_pair = open_pairs.get(pair)
                    if windows_of_pair is None:  # a service new to the user's open windows
                        services = user_services.get(user_id, 0)
                        if services >= max_services:
                            dead_letters.append(DeadLetter(
                                value, key, f"{TOO_MANY_SERVICES}: {services} services with "
                                "open windows already", partition, offset))
                            continue
                        user_services[user_id] = services + 1
                        open_pairs[pair] = 1
                    else:
                        open_pairs[pair] = windows_of_pair + 1
                    acc = accs[pair] = WindowAcc()
                    if key is not None and key != user_id.encode():  # checked once per window
                        misrouted += 1
                acc.add(event)
                if ts_ms > max_event_ms:
                    max_event_ms = ts_ms
                    if ts_ms - lateness_ms > mark:
                        mark = ts_ms - lateness_ms
            else:
                late += 1
            if ts_ms - ts_ms % BUCKET_MS != id_bucket:
                dedup.max_ts_ms = dedup_max_ms
                bucket_ids = dedup.bucket(ts_ms)  # None: older than the horizon
                id_bucket = ts_ms - ts_ms % BUCKET_MS
            if bucket_ids is not None:
                bucket_ids.append(id_key)
                keep_id(id_key)
                if ts_ms > dedup_max_ms:
                    dedup_max_ms = ts_ms
            encode_into(astuple(event) + (ts_ms, not on_time, partition, offset, ingested_ms),  # noqa: RUF005
                        buffer, -1)
            end_row(0x0A)
        watermark.value = mark
        watermark.max_event_ms = max_event_ms
        dedup.max_ts_ms = dedup_max_ms
        dead = len(dead_letters) - dead_before
        rows = len(batch.records) - dead - duplicates
        if rows:
            out.event_rows.append(EventRows(rows, bytes(buffer), first_window))
        dedup.expire()
        metrics = self.metrics
        metrics.events_in += len(batch.records)
        metrics.valid += len(batch.records) - dead
        metrics.dead_lettered += dead
        metrics.duplicates += duplicates
        metrics.late += late
        if misrouted:
            if not metrics.misrouted:
                logger.warning(
                    "partition %s: events keyed by something other than user_id; "
                    "per-user windows need key = user_id (DESIGN §1)",
                    partition,
                )
            metrics.misrouted += misrouted

    def _close_ready(self, out: PartitionOutput) -> None:
        watermark = self.watermark.value
        window_ms = self.config.window_ms
        open_pairs, user_services = self.open_pairs, self.user_services
        ready = sorted(start for start in self.windows if start + window_ms <= watermark)
        for start in ready:
            bounds = window_bounds(start, window_ms)
            for pair, acc in sorted(self.windows.pop(start).items()):
                user_id, service = pair
                out.stats.append(close_window(user_id, service, start, window_ms, acc, bounds))
                windows_of_pair = open_pairs.pop(pair)
                if windows_of_pair > 1:
                    open_pairs[pair] = windows_of_pair - 1
                elif user_services[user_id] > 1:
                    user_services[user_id] -= 1
                else:
                    del user_services[user_id]
        self.metrics.windows_closed += len(out.stats)
        self.metrics.watermark_ms[self.partition] = watermark
        self.metrics.max_event_ms[self.partition] = self.watermark.max_event_ms
        if self.hook is not None:
            # Alerts wait for the next batch: the stats leave first (at a window boundary
            # evaluating 10,000 windows held up the stats of the partitions closing next).
            self.unevaluated = (out.stats, watermark)

    def _evaluate_closed(self, out: PartitionOutput) -> None:
        """The hook's alerts, notifications and incident signals for the windows closed by
        the previous batch, evaluated with the rules and watermark of their closing."""
        if self.hook is None or self.unevaluated is None:
            return
        stats, watermark = self.unevaluated
        self.unevaluated = None
        alerts, notifications = self.hook.on_windows(stats, watermark)
        out.alerts.extend(alerts)
        out.notifications.extend(notifications)
        out.signals.extend(self.hook.take_signals())


def _ts_reason(ts_ms: int, wall_ms: int, config: ProcessorConfig) -> str:
    """Why an event's time is not admitted (the rare path: formatted only then)."""
    return ts_reason(ts_ms, wall_ms, config.max_clock_skew_seconds, config.events_ttl_days)

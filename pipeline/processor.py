"""Per-partition processing: decode → dedup → watermark → windows → PartitionOutput.

A user's events share a Kafka partition (key = user_id), so all state of a user — dedup
ids, open windows, alert state — lives with that partition's processor, and one item per
poll batch crosses the dataflow instead of one per event. Processing is deterministic in
the partition's order: after a resume, replayed records produce the same rows, the same
late/dup verdicts and the same windows, so the idempotent sinks converge.
"""

from __future__ import annotations

import logging
import pickle
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bytewax.operators import StatefulBatchLogic
from msgspec.structs import astuple

from pipeline.dedup import BUCKET_MS, Deduplicator, IdLog
from pipeline.items import DeadLetter, EventRows, PartitionOutput, RuleUpdates, SourceBatch
from pipeline.metrics import METRICS, PipelineMetrics
from pipeline.rows import encode_row_into
from pipeline.windows import NEG_INF, NO_WINDOW, Watermark, WindowAcc, close_window, window_bounds
from schemas.events import InvalidEvent, decode_event
from schemas.stats import StatsRecord

logger = logging.getLogger(__name__)

RUN_ID = uuid.uuid4().hex  # one per process: wall time is trusted only within a run


class WindowHook(Protocol):
    """Called with every batch of closed windows (the alert evaluator implements it)."""

    def on_control(self, item: Any) -> None: ...

    def take_signals(self) -> list[Any]: ...

    def on_windows(
        self, stats: list[StatsRecord], watermark_ms: int
    ) -> tuple[list[Any], list[Any]]: ...

    def snapshot(self) -> Any: ...


HookFactory = Callable[[Any], WindowHook]  # resumed hook state (or None) → hook


@dataclass(frozen=True)
class ProcessorConfig:
    window_seconds: int = 10
    allowed_lateness_seconds: int = 5
    dedup_horizon_seconds: int = 3600
    dedup_max_ids: int = 2_000_000
    dedup_dir: Path | None = None  # the id logs (pipeline.dedup.IdLog); None: in the snapshot

    @property
    def window_ms(self) -> int:
        return self.window_seconds * 1000


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
        hook_state: Any = None
        if resume is None:
            self.watermark = Watermark(config.allowed_lateness_seconds * 1000)
            self.dedup = Deduplicator(horizon_ms, config.dedup_max_ids)
            self.windows: dict[int, dict[tuple[str, str], WindowAcc]] = {}
        else:
            state = pickle.loads(resume)
            self.watermark = state["watermark"]
            self.dedup = Deduplicator.restore(state["dedup"], horizon_ms, config.dedup_max_ids,
                                              self._id_log(state["partition"]))
            self.windows = state["windows"]
            hook_state = state["hook"]
            self.partition = state["partition"]
            self.unevaluated = state.get("unevaluated")  # absent from keypulse 0.1 snapshots
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
            "partition": self.partition,
            "watermark": self.watermark,
            "dedup": self.dedup.snapshot(),
            "windows": self.windows,
            "hook": self.hook.snapshot() if self.hook is not None else None,
            "unevaluated": self.unevaluated,
        }
        return pickle.dumps(state, protocol=5)

    def _id_log(self, partition: int) -> IdLog | None:
        if self.config.dedup_dir is None or partition < 0:
            return None
        return IdLog(self.config.dedup_dir, partition)

    # -- work --------------------------------------------------------------------------------

    def _process(self, batch: SourceBatch, out: PartitionOutput) -> None:
        watermark = self.watermark
        watermark.observe_wall(batch.wall_ms, batch.caught_up, self.run_id)
        if not batch.records:
            return
        # The per-event loop is the dataflow's hot path: names are bound locally, the
        # watermark and the dedup rule (Deduplicator.seen) are applied inline, in locals
        # written back once per batch, and each event's row (pipeline.rows.EVENT_ROW_COLUMNS)
        # is appended to the batch's buffer at once, while the event is hot. Tuple
        # concatenation builds the row faster than unpacking into a display (RUF005).
        window_ms = self.config.window_ms
        windows = self.windows
        dedup = self.dedup
        seen_ids = dedup.ids
        keep_id = seen_ids.add
        id_bucket, bucket_ids = NEG_INF, None
        dedup_max_ms = dedup.max_ts_ms
        buffer = bytearray()
        encode_into = encode_row_into
        end_row = buffer.append  # end_row(0x0A): each row ends with a newline
        partition = batch.partition
        ingested_ms = int(time.time() * 1000)
        lateness_ms = watermark.lateness_ms
        mark = watermark.value
        max_event_ms = watermark.max_event_ms
        dead = duplicates = late = misrouted = 0
        accs_start = first_window = NO_WINDOW
        accs: dict[tuple[str, str], WindowAcc] = {}
        for offset, key, value in batch.records:
            try:
                event = decode_event(value)
            except InvalidEvent as exc:
                out.dead_letters.append(DeadLetter(value, key, exc.reason, partition, offset))
                dead += 1
                continue
            user_id = event.user_id
            ts = event.ts
            ts_ms = ts if type(ts) is int else event.ts_ms
            id_key = f"{user_id}\x1f{event.event_id}"  # pipeline.dedup.id_key
            if id_key in seen_ids:
                duplicates += 1
                continue
            if ts_ms - ts_ms % BUCKET_MS != id_bucket:
                dedup.max_ts_ms = dedup_max_ms
                bucket_ids = dedup.bucket(ts_ms)  # None: older than the horizon
                id_bucket = ts_ms - ts_ms % BUCKET_MS
            if bucket_ids is not None:
                bucket_ids.append(id_key)
                keep_id(id_key)
                if ts_ms > dedup_max_ms:
                    dedup_max_ms = ts_ms
            start = ts_ms - ts_ms % window_ms
            if start + window_ms <= mark:
                late += 1
                encode_into(astuple(event) + (ts_ms, True, partition, offset, ingested_ms),  # noqa: RUF005
                            buffer, -1)
                end_row(0x0A)
                continue
            if start != accs_start:  # events come roughly in time order: mostly the same
                found = windows.get(start)
                if found is None:
                    found = windows[start] = {}
                accs, accs_start = found, start
                if start < first_window:
                    first_window = start
            acc = accs.get((user_id, event.service))
            if acc is None:
                acc = accs[(user_id, event.service)] = WindowAcc()
                if key is not None and key != user_id.encode():  # checked once per window
                    misrouted += 1
            acc.add(event)
            if ts_ms > max_event_ms:
                max_event_ms = ts_ms
                if ts_ms - lateness_ms > mark:
                    mark = ts_ms - lateness_ms
            encode_into(astuple(event) + (ts_ms, False, partition, offset, ingested_ms),  # noqa: RUF005
                        buffer, -1)
            end_row(0x0A)
        watermark.value = mark
        watermark.max_event_ms = max_event_ms
        dedup.max_ts_ms = dedup_max_ms
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
        ready = sorted(start for start in self.windows if start + window_ms <= watermark)
        for start in ready:
            bounds = window_bounds(start, window_ms)
            for (user_id, service), acc in sorted(self.windows.pop(start).items()):
                out.stats.append(close_window(user_id, service, start, window_ms, acc, bounds))
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

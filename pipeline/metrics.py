"""Pipeline counters for logs, the API's system stats and `/metrics`.

One registry per process (`METRICS`); the dataflow's steps update it in place and anyone
in the process reads `METRICS.snapshot()`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

from core.metrics import register

logger = logging.getLogger(__name__)


@dataclass
class PipelineMetrics:
    events_in: int = 0
    valid: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    late: int = 0
    misrouted: int = 0  # windows whose first event was keyed by something other than user_id
    windows_closed: int = 0
    event_rows_written: int = 0
    stats_rows_written: int = 0
    insert_batches: int = 0
    insert_seconds_total: float = 0.0
    insert_seconds_last: float = 0.0
    insert_retries: int = 0  # failed insert attempts that were tried again
    storage_dead_lettered: int = 0  # rows dead-lettered after every insert attempt failed
    stats_unpublished: int = 0  # of those, stats rows: never on usage.stats (not queryable)
    dlq_truncated: int = 0  # dead letters too large for the DLQ, stored truncated
    dlq_failed: int = 0  # dead letters the DLQ refused even then (logged)
    rollup_refreshes: int = 0  # recomputes of a rollup level's waiting buckets (rollups.py)
    rollup_seconds_total: float = 0.0
    rollup_failures: int = 0  # recomputes that failed every attempt (their buckets wait)
    watermark_ms: dict[int, int] = field(default_factory=dict)
    max_event_ms: dict[int, int] = field(default_factory=dict)
    # Per partition, set by the source: when it last handed over a batch (epoch seconds)
    # and whether its input was caught up then (health: stuck versus quiet).
    batch_at: dict[int, float] = field(default_factory=dict)
    caught_up: dict[int, bool] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last_log: float = 0.0

    def record_insert(self, rows: int, stats_rows: int, seconds: float) -> None:
        with self._lock:
            self.event_rows_written += rows
            self.stats_rows_written += stats_rows
            self.insert_batches += 1
            self.insert_seconds_total += seconds
            self.insert_seconds_last = seconds

    def record_rollup(self, seconds: float) -> None:
        with self._lock:
            self.rollup_refreshes += 1
            self.rollup_seconds_total += seconds

    def add(self, **counts: int) -> None:
        """Add to integer counters from any thread: `add(dlq_truncated=1)`."""
        with self._lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        data: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")
        }
        data["watermark_ms"] = dict(self.watermark_ms)
        data["max_event_ms"] = dict(self.max_event_ms)
        data["batch_at"] = dict(self.batch_at)
        data["caught_up"] = dict(self.caught_up)
        marks = [v for v in self.watermark_ms.values() if v > 0]
        newest = [v for v in self.max_event_ms.values() if v > 0]
        data["watermark_lag_seconds"] = round(now - min(marks) / 1000, 3) if marks else None
        data["freshness_lag_seconds"] = round(now - max(newest) / 1000, 3) if newest else None
        data["uptime_seconds"] = round(now - self.started_at, 1)
        return data

    def maybe_log(self, every_seconds: float = 10.0) -> None:
        now = time.monotonic()
        if now - self._last_log < every_seconds:
            return
        self._last_log = now
        snap = self.snapshot()
        logger.info(
            "pipeline: in=%s valid=%s dlq=%s dup=%s late=%s windows=%s rows=%s "
            "watermark_lag=%ss freshness_lag=%ss last_insert=%.3fs",
            snap["events_in"],
            snap["valid"],
            snap["dead_lettered"],
            snap["duplicates"],
            snap["late"],
            snap["windows_closed"],
            snap["event_rows_written"],
            snap["watermark_lag_seconds"],
            snap["freshness_lag_seconds"],
            snap["insert_seconds_last"],
        )


METRICS = PipelineMetrics()
register("pipeline", METRICS.snapshot)

"""Pipeline counters for logs, the API's system stats and `/metrics`.

One registry per process (`METRICS`); the dataflow's steps update it in place and anyone
in the process reads `METRICS.snapshot()`. `/metrics` reads it at scrape time
(`exposition`: the counters and gauges described in `DESCRIBED`, and three histograms the
sink's writer observes once per insert, never per event).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec
from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric

from core.metrics import register
from core.outputs import EVENT_ROWS_OUTPUT, USAGE_STATS_OUTPUT
from core.telemetry import LATENCY_BUCKETS, Described, families, untyped

logger = logging.getLogger(__name__)

_TS_MS = EVENT_ROWS_OUTPUT.columns.index("ts_ms")
_INGESTED_MS = EVENT_ROWS_OUTPUT.columns.index("ingested_ms")
FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                     600.0, 1800.0, 3600.0, float("inf"))


def _insert_duration() -> Histogram:
    return Histogram("keypulse_pipeline_insert_duration_seconds",
                     "ClickHouse inserts of event rows and of window stats: seconds per "
                     "insert, retries included", ("table",), registry=None,
                     buckets=LATENCY_BUCKETS)


def _freshness() -> Histogram:
    return Histogram("keypulse_pipeline_freshness_seconds",
                     "Per insert of event rows: seconds from the event time (ts) of the "
                     "batch's first row to ClickHouse having stored the batch (event → "
                     "queryable; client clock skew and late events included)",
                     registry=None, buckets=FRESHNESS_BUCKETS)


def _read_to_store() -> Histogram:
    return Histogram("keypulse_pipeline_read_to_store_seconds",
                     "Per insert of event rows: seconds from the pipeline reading the "
                     "batch's first row from Kafka to ClickHouse having stored the batch",
                     registry=None, buckets=FRESHNESS_BUCKETS)


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
    records_refused: int = 0  # notifications/apikey.events records not stored (records.py)
    watermark_ms: dict[int, int] = field(default_factory=dict)
    max_event_ms: dict[int, int] = field(default_factory=dict)
    # Per partition, set by the source: when it last handed over a batch (epoch seconds)
    # and whether its input was caught up then (health: stuck versus quiet).
    batch_at: dict[int, float] = field(default_factory=dict)
    caught_up: dict[int, bool] = field(default_factory=dict)
    # Per partition, set by the source per batch: the next offset it reads and the log end
    # it last saw (consumer lag and throughput in the system snapshot, core/system.py).
    offsets: dict[int, int] = field(default_factory=dict)
    end_offsets: dict[int, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last_log: float = 0.0
    _insert_duration: Histogram = field(default_factory=_insert_duration, repr=False)
    _freshness: Histogram = field(default_factory=_freshness, repr=False)
    _read_to_store: Histogram = field(default_factory=_read_to_store, repr=False)

    def record_insert(self, rows: int, stats_rows: int, seconds: float, *,
                      events: bytes = b"") -> None:
        """One insert done: `rows` event rows (their JSONCompactEachRow bytes in `events`,
        whose first row dates the batch for the freshness histograms) or `stats_rows`."""
        table = EVENT_ROWS_OUTPUT.table if rows else USAGE_STATS_OUTPUT.table
        self._insert_duration.labels(table).observe(seconds)
        if events:
            self._observe_freshness(events)
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
        data["offsets"] = dict(self.offsets)
        data["end_offsets"] = dict(self.end_offsets)
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

    def _observe_freshness(self, events: bytes) -> None:
        end = events.find(b"\n")
        try:
            row = msgspec.json.decode(events[:end] if end >= 0 else events)
            ts_ms, ingested_ms = int(row[_TS_MS]), int(row[_INGESTED_MS])
        except (msgspec.DecodeError, IndexError, TypeError, ValueError):
            logger.debug("no freshness for a batch whose first row does not parse")
            return
        now_ms = time.time() * 1000
        self._freshness.observe(max(0.0, now_ms - ts_ms) / 1000)
        self._read_to_store.observe(max(0.0, now_ms - ingested_ms) / 1000)

    def exposition(self) -> Iterator[Metric]:
        """The Prometheus families, read now (core.metrics, core.telemetry)."""
        snap = self.snapshot()
        yield from families("pipeline", snap, DESCRIBED)
        yield from untyped("pipeline", {k: v for k, v in snap.items() if k not in DESCRIBED})
        yield from self._insert_duration.collect()
        yield from self._freshness.collect()
        yield from self._read_to_store.collect()


_PER_PARTITION = "per partition (label `partition`)"
DESCRIBED: Described = {
    "events_in": ("counter", "events read from Kafka"),
    "valid": ("counter", "events that passed validation"),
    "dead_lettered": ("counter", "events sent to the dead-letter topic"),
    "duplicates": ("counter", "events dropped as duplicates (event_id seen)"),
    "late": ("counter", "events after their window closed (stored, counted in no window)"),
    "misrouted": ("counter", "windows whose first event was keyed by something other than "
                             "user_id"),
    "windows_closed": ("counter", "(user, service) windows closed"),
    "event_rows_written": ("counter", "event rows stored in ClickHouse"),
    "stats_rows_written": ("counter", "window stats rows stored in ClickHouse"),
    "insert_batches": ("counter", "ClickHouse inserts of event rows and window stats"),
    "insert_seconds_total": ("counter", "seconds spent in those inserts"),
    "insert_retries": ("counter", "failed insert attempts that were tried again"),
    "storage_dead_lettered": ("counter", "rows dead-lettered after every insert attempt "
                                         "failed"),
    "stats_unpublished": ("counter", "of those, window stats never published on usage.stats"),
    "dlq_truncated": ("counter", "dead letters too large for the DLQ, stored truncated"),
    "dlq_failed": ("counter", "dead letters the DLQ refused even truncated"),
    "rollup_refreshes": ("counter", "recomputes of a rollup level's waiting buckets"),
    "rollup_seconds_total": ("counter", "seconds spent in rollup recomputes"),
    "rollup_failures": ("counter", "rollup recomputes that failed every attempt"),
    "records_refused": ("counter", "notification and API-key event records not stored"),
    "insert_seconds_last": ("gauge", "seconds of the last insert"),
    "watermark_ms": ("gauge", f"event-time watermark, epoch ms, {_PER_PARTITION}"),
    "max_event_ms": ("gauge", f"newest event time read, epoch ms, {_PER_PARTITION}"),
    "batch_at": ("gauge", f"when the source last handed over a batch, epoch seconds, "
                          f"{_PER_PARTITION}"),
    "caught_up": ("gauge", f"1 when the partition had no backlog at its last batch, "
                           f"{_PER_PARTITION}"),
    "offsets": ("gauge", f"next offset the source reads, {_PER_PARTITION}"),
    "end_offsets": ("gauge", f"log end offset the source last saw, {_PER_PARTITION}"),
    "watermark_lag_seconds": ("gauge", "wall time minus the lowest partition watermark"),
    "freshness_lag_seconds": ("gauge", "wall time minus the newest event time read"),
    "uptime_seconds": ("gauge", "seconds since these counters started"),
    "started_at": ("gauge", "when these counters started, epoch seconds"),
}

METRICS = PipelineMetrics()
register("pipeline", METRICS.snapshot, METRICS.exposition)

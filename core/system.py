"""The system snapshot (schemas/system.py): one builder for `GET /v1/admin/system` and the
WebSocket's `system_stats`, so both say the same thing.

    snapshot = telemetry.system.snapshot(settings, now=clock(), store=Store(key, read))

What a section needs, and where it comes from:

- process, machine: psutil, always.
- websocket: the `ws` provider a running bridge registers in core.metrics.
- kafka, pipeline: the `pipeline` provider (pipeline.metrics) when the dataflow runs in this
  process (its partitions have reported); otherwise the log ends of `usage.events` asked of
  Kafka (produce rate, no lag: the pipeline keeps its positions in its recovery snapshots, not
  in Kafka), and freshness from what ClickHouse holds.
- clickhouse: a `Store` (api.queries.store_figures). The API passes its own; a process that
  serves the API registers one (`register_store`) so that a bridge beside it reports the same.

The parts that block (a ClickHouse query, a Kafka round trip) are cached `CACHE_S` seconds and
bounded by a timeout; `snapshot(block=False)` serves only cached figures (the bridge's event
loop), and `refresh` fills them (from a thread). A section that cannot be measured here is
`None` with its reason in `unavailable`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil
from confluent_kafka import Consumer, KafkaError, TopicPartition

from core import metrics
from core.clock import from_ms
from core.kafka import consumer_config
from core.settings import Settings
from core.topics import USAGE_EVENTS
from schemas.system import (
    ClickHouseStats,
    KafkaSource,
    KafkaStats,
    MachineStats,
    PartitionStats,
    PipelinePartition,
    PipelineSource,
    PipelineStats,
    ProcessStats,
    SystemSnapshot,
    WebSocketStats,
)

logger = logging.getLogger(__name__)

CACHE_S = 5.0  # how long ClickHouse's and Kafka's answers are reused
KAFKA_TIMEOUT_S = 1.0  # per Kafka request of a probe
MIN_RATE_INTERVAL_S = 1.0  # rates are measured over at least this long
NO_RATE = (f"a rate needs two snapshots at least {MIN_RATE_INTERVAL_S:g} s apart (or a counter "
           "went back: a restart); the next snapshot has it")
NOT_MEASURED = "not measured yet (in the next snapshot)"


@dataclass(frozen=True)
class StoreFigures:
    """What a ClickHouse store answers for a snapshot."""

    stats: ClickHouseStats
    newest_event_ms: int | None  # the newest stored usage event's time
    newest_window_end_ms: int | None  # the newest stored stats window's end


@dataclass(frozen=True)
class Store:
    """A ClickHouse store to measure: `read` blocks; answers are cached by `key`."""

    key: Hashable
    read: Callable[[], StoreFigures]


class Rates:
    """Per-second growth of counters, each measured between samples at least
    `MIN_RATE_INTERVAL_S` apart (in between, the last rate measured). None until two
    samples, and after a counter went backwards (a restart)."""

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[float, float]] = {}
        self._rate: dict[Hashable, float | None] = {}

    def rate(self, key: Hashable, value: float, at: float) -> float | None:
        last = self._last.get(key)
        if last is None:
            self._last[key] = (at, value)
            self._rate[key] = None
        elif at - last[0] >= MIN_RATE_INTERVAL_S:
            then, before = last
            self._rate[key] = None if value < before else round((value - before) / (at - then), 2)
            self._last[key] = (at, value)
        return self._rate.get(key)


@dataclass
class _Cached:
    at: float  # monotonic
    value: Any  # the answer, or the reason there is none (str)


class SystemSnapshots:
    """Builds snapshots. The process's `core.telemetry.Telemetry` holds one (made by the
    command that starts the process and handed to the API and the bridge), so rates and caches
    are shared by whoever asks in that process."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic,
                 kafka_timeout: float = KAFKA_TIMEOUT_S) -> None:
        self.monotonic = monotonic
        self.kafka_timeout = kafka_timeout
        self._lock = threading.Lock()
        self._measuring = threading.Lock()  # one refresh at a time: no herd of probes
        self._rates = Rates()
        self._stores: dict[Hashable, _Cached] = {}
        self._brokers: dict[tuple[str, str], _Cached] = {}
        self._registered: Store | None = None
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading is since now
        self._cpu_times = _cpu_times()

    # -- the process's store -----------------------------------------------------------

    def register_store(self, store: Store) -> None:
        with self._lock:
            self._registered = store

    def unregister_store(self, store: Store) -> None:
        with self._lock:
            if self._registered is store:
                self._registered = None

    # -- snapshots ---------------------------------------------------------------------

    def snapshot(self, settings: Settings, *, now: float, store: Store | None = None,
                 block: bool = True) -> SystemSnapshot:
        """The snapshot at `now` (epoch seconds, the caller's clock). `store`: the ClickHouse
        to measure, else the registered one. With `block=False` nothing waits on ClickHouse
        or Kafka: their last cached figures are used (see `refresh`)."""
        store = store or self._registered
        if block:
            self.refresh(settings, store=store, stale_only=True)
        unavailable: dict[str, str] = {}
        parts = metrics.collect()
        figures = self._store_figures(store, unavailable)
        pipeline_part = _running_pipeline(parts.get("pipeline"), unavailable)
        with self._lock:
            at = self.monotonic()
            websocket = self._websocket(parts.get("ws"), at, unavailable)
            kafka: KafkaStats | None
            if pipeline_part is not None:
                kafka = self._kafka_of_pipeline(settings, pipeline_part, at)
            else:
                kafka = self._kafka_of_broker(settings, unavailable)
            pipeline = self._pipeline(pipeline_part, figures, now, at, unavailable)
        if _rate_missing(websocket, kafka, pipeline):
            unavailable["rates"] = NO_RATE
        return SystemSnapshot(
            at=datetime.fromtimestamp(now, tz=UTC),
            process=self._process_stats(),
            machine=self._machine_stats(),
            websocket=websocket,
            kafka=kafka,
            pipeline=pipeline,
            clickhouse=None if figures is None else figures.stats,
            unavailable=unavailable,
        )

    def refresh(self, settings: Settings, *, store: Store | None = None,
                stale_only: bool = False) -> None:
        """Measure what blocks (ClickHouse, Kafka's log ends) now, or only what is older
        than `CACHE_S` (`stale_only`). Blocking: call it from a thread, not an event loop."""
        with self._measuring:
            self._refresh(settings, store or self._registered, stale_only=stale_only)

    def _refresh(self, settings: Settings, store: Store | None, *, stale_only: bool) -> None:
        if store is not None and not (stale_only and self._fresh(self._stores.get(store.key))):
            try:
                value: Any = store.read()
            except Exception as exc:  # clickhouse-connect and chDB raise unrelated types
                logger.warning("system snapshot: ClickHouse did not answer: %s", exc)
                value = f"ClickHouse did not answer: {_first_line(exc)}"
            with self._lock:
                self._stores[store.key] = _Cached(self.monotonic(), value)
        if _running_pipeline(metrics.collect().get("pipeline"), {}) is not None:
            return  # the pipeline's own positions and log ends: nothing to ask Kafka
        key = (settings.kafka_bootstrap, settings.topic(USAGE_EVENTS))
        if stale_only and self._fresh(self._brokers.get(key)):
            return
        try:
            ends: Any = self._log_ends(settings, key[1])
        except Exception as exc:  # KafkaException, or the topic is missing
            ends = f"Kafka did not answer: {_first_line(exc)}"
            logger.info("system snapshot: %s", ends)
        with self._lock:
            at = self.monotonic()
            if isinstance(ends, dict):
                ends = {p: (end, self._rates.rate(("broker", key, p), end, at))
                        for p, end in ends.items()}
            self._brokers[key] = _Cached(at, ends)

    def _fresh(self, cached: _Cached | None) -> bool:
        return cached is not None and self.monotonic() - cached.at < CACHE_S

    # -- sections ----------------------------------------------------------------------

    def _machine_stats(self) -> MachineStats:
        busy, total = _cpu_times()
        with self._lock:
            busy_before, total_before = self._cpu_times
            self._cpu_times = busy, total
        spent = total - total_before
        memory = psutil.virtual_memory()
        return MachineStats(
            cpu_count=os.cpu_count() or 1,
            cpu_percent=round(min(100.0, max(0.0, 100 * (busy - busy_before) / spent)), 1)
            if spent > 0 else 0.0,
            memory_total_bytes=memory.total,
            memory_available_bytes=memory.available,
            memory_percent=memory.percent,
        )

    def _process_stats(self) -> ProcessStats:
        process = self._process
        with process.oneshot():
            memory = process.memory_info()
            return ProcessStats(
                pid=process.pid,
                cpu_percent=process.cpu_percent(None),
                memory_rss_bytes=memory.rss,
                memory_percent=round(process.memory_percent(), 3),
                threads=process.num_threads(),
                uptime_s=round(time.time() - process.create_time(), 1),
            )

    def _store_figures(self, store: Store | None, unavailable: dict[str, str]
                       ) -> StoreFigures | None:
        if store is None:
            unavailable["clickhouse"] = ("no ClickHouse client in this process (`keypulse ws` "
                                         "runs without one); GET /v1/admin/system has it")
            return None
        with self._lock:
            cached = self._stores.get(store.key)
        if cached is None:
            unavailable["clickhouse"] = NOT_MEASURED
            return None
        if isinstance(cached.value, str):
            unavailable["clickhouse"] = cached.value
            return None
        figures: StoreFigures = cached.value
        return figures

    def _websocket(self, part: Mapping[str, object] | None, at: float,
                   unavailable: dict[str, str]) -> WebSocketStats | None:
        if part is None:
            unavailable["websocket"] = "no WebSocket bridge runs in this process"
            return None
        lag = _int(part.get("consumer_lag"))
        return WebSocketStats(
            connections=_int(part.get("connections")) or 0,
            users=_int(part.get("connected_users")) or 0,
            messages_per_s=self._counter_rate("ws.messages_in", part.get("messages_in"), at),
            skipped_per_s=self._counter_rate("ws.messages_skipped", part.get("messages_skipped"),
                                             at),
            frames_out_per_s=self._counter_rate("ws.frames_out", part.get("frames_out"), at),
            consumer_lag=lag if lag is not None and lag >= 0 else None,
        )

    def _counter_rate(self, key: Hashable, value: object, at: float) -> float | None:
        number = _int(value)
        return None if number is None else self._rates.rate(key, number, at)

    def _kafka_of_pipeline(self, settings: Settings, part: Mapping[str, Any], at: float
                           ) -> KafkaStats:
        positions: dict[int, int] = dict(part.get("offsets") or {})
        ends: dict[int, int] = dict(part.get("end_offsets") or {})
        partitions = []
        for partition in sorted(set(positions) | set(ends)):
            position, end = positions.get(partition), ends.get(partition)
            partitions.append(PartitionStats(
                partition=partition,
                log_end_offset=end,
                position=position,
                lag=None if position is None or end is None else max(0, end - position),
                produced_per_s=None if end is None
                else self._rates.rate(("end", partition), end, at),
                consumed_per_s=None if position is None
                else self._rates.rate(("position", partition), position, at),
            ))
        lags = [p.lag for p in partitions if p.lag is not None]
        return KafkaStats(topic=settings.topic(USAGE_EVENTS), source=KafkaSource.PIPELINE,
                          lag=sum(lags) if lags else None, partitions=partitions)

    def _kafka_of_broker(self, settings: Settings, unavailable: dict[str, str]
                         ) -> KafkaStats | None:
        topic = settings.topic(USAGE_EVENTS)
        cached = self._brokers.get((settings.kafka_bootstrap, topic))
        if cached is None:
            unavailable["kafka"] = NOT_MEASURED
            return None
        if isinstance(cached.value, str):
            unavailable["kafka"] = cached.value
            return None
        unavailable["kafka.lag"] = ("the pipeline does not run in this process, and it keeps "
                                    "its positions in its recovery snapshots, not in Kafka")
        partitions = [
            PartitionStats(partition=partition, log_end_offset=end, position=None, lag=None,
                           produced_per_s=rate, consumed_per_s=None)
            for partition, (end, rate) in sorted(cached.value.items())
        ]
        return KafkaStats(topic=topic, source=KafkaSource.BROKER, lag=None,
                          partitions=partitions)

    def _pipeline(self, part: Mapping[str, Any] | None, figures: StoreFigures | None,
                  now: float, at: float, unavailable: dict[str, str]) -> PipelineStats | None:
        window_end = None if figures is None else figures.newest_window_end_ms
        if part is None:
            if figures is None:
                unavailable["pipeline"] = ("the pipeline does not run in this process and no "
                                           "ClickHouse here tells its freshness")
                return None
            unavailable["pipeline.watermark"] = "the pipeline does not run in this process"
            return PipelineStats(
                source=PipelineSource.CLICKHOUSE, watermark=None, watermark_lag_s=None,
                newest_event=_time(figures.newest_event_ms),
                freshness_s=_age(now, figures.newest_event_ms),
                newest_window_end=_time(window_end), window_freshness_s=_age(now, window_end),
                events_per_s=None, partitions=[])
        marks: dict[int, int] = dict(part.get("watermark_ms") or {})
        newest: dict[int, int] = dict(part.get("max_event_ms") or {})
        batch_at: dict[int, float] = dict(part.get("batch_at") or {})
        caught_up: dict[int, bool] = dict(part.get("caught_up") or {})
        partitions = [
            PipelinePartition(
                partition=partition,
                watermark=_time(marks.get(partition)),
                newest_event=_time(newest.get(partition)),
                caught_up=caught_up.get(partition),
                idle_s=None if partition not in batch_at
                else round(max(0.0, now - batch_at[partition]), 3),
            )
            for partition in sorted(set(marks) | set(newest) | set(batch_at))
        ]
        known_marks = [mark for mark in marks.values() if mark > 0]
        known_newest = [ms for ms in newest.values() if ms > 0]
        watermark = min(known_marks) if known_marks else None
        newest_event = max(known_newest) if known_newest else None
        if watermark is None:
            unavailable["pipeline.watermark"] = "no window has closed yet"
        if figures is None:
            unavailable["pipeline.newest_window_end"] = "no ClickHouse in this process"
        return PipelineStats(
            source=PipelineSource.PIPELINE,
            watermark=_time(watermark),
            watermark_lag_s=_age(now, watermark),
            newest_event=_time(newest_event),
            freshness_s=_age(now, newest_event),
            newest_window_end=_time(window_end),
            window_freshness_s=_age(now, window_end),
            events_per_s=self._counter_rate("pipeline.events_in", part.get("events_in"), at),
            partitions=partitions,
        )

    # -- Kafka -------------------------------------------------------------------------

    def _log_ends(self, settings: Settings, topic: str) -> dict[int, int]:
        """Each partition's high watermark, asked of the broker by a short-lived consumer
        (nothing left behind retrying a broker that is down)."""
        config = consumer_config(settings, group_id="keypulse-system",
                                 **{"client.id": "keypulse-system", "log_level": 2})
        consumer = Consumer(config)
        try:
            metadata = consumer.list_topics(topic, timeout=self.kafka_timeout)
            info = metadata.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                msg = f"topic {topic} does not exist"
                raise LookupError(msg)
            ends = {}
            for partition in sorted(info.partitions):
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                            timeout=self.kafka_timeout)
                ends[partition] = int(high)
            return ends
        finally:
            consumer.close()


def _running_pipeline(part: Mapping[str, Any] | None, unavailable: dict[str, str]
                      ) -> Mapping[str, Any] | None:
    """The pipeline's figures when it runs in this process: its provider is registered and
    its partitions have reported."""
    if part is None:
        return None
    if not part.get("batch_at") and not part.get("offsets"):
        unavailable["pipeline.partitions"] = ("the pipeline's metrics are registered in this "
                                              "process but no partition has reported")
        return None
    return part


def _rate_missing(websocket: WebSocketStats | None, kafka: KafkaStats | None,
                  pipeline: PipelineStats | None) -> bool:
    """Whether a rate of a measured counter is still None (its first sample)."""
    if websocket is not None and None in (websocket.messages_per_s, websocket.skipped_per_s,
                                          websocket.frames_out_per_s):
        return True
    if pipeline is not None and pipeline.source is PipelineSource.PIPELINE \
            and pipeline.events_per_s is None:
        return True
    return kafka is not None and any(
        (p.log_end_offset is not None and p.produced_per_s is None)
        or (p.position is not None and p.consumed_per_s is None) for p in kafka.partitions)


def _cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine, as psutil.cpu_percent counts them. (Its own
    cpu_percent(None) keeps one previous sample per calling thread: from a thread pool it
    answers 0.0 on every new thread.)"""
    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0), total


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _time(ms: int | None) -> datetime | None:
    """A time, None when unknown (a watermark before any event is a sentinel below 0)."""
    return from_ms(ms) if ms is not None and ms > 0 else None


def _age(now: float, ms: int | None) -> float | None:
    return round(now - ms / 1000, 3) if ms is not None and ms > 0 else None


def _first_line(exc: BaseException) -> str:
    first = exc.args[0] if exc.args else None
    if isinstance(first, KafkaError):  # KafkaException(KafkaError): its text, not its repr
        return str(first.str())[:300]
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]

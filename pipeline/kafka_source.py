"""A Kafka source that emits one item per poll batch, and idle ticks.

Bytewax's own KafkaSource emits one item per message; at 100k events/s the per-item cost
of the dataflow dominates. This source hands the processor a whole poll batch
(`SourceBatch`) and, when a partition is idle, a tick every `tick_ms` carrying the clock's
time so windows close on a quiet stream. Offsets live in Bytewax's recovery snapshots
(`snapshot()` is the next offset to read); consumer groups are not used.

A record's value is passed as-is: a tombstone (a null value) stays `None`. Each run has its
own `stop` event (the runner's): set, every partition ends after its current batch. With
`metrics`, each partition records when it last handed over a batch and whether it was caught
up, which is how health tells a stuck dataflow from a quiet one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from core.clock import Clock, system_clock
from core.errors import ServiceError
from core.kafka import PREFETCH_SETTINGS
from pipeline.items import SourceBatch, TopicBatch
from pipeline.metrics import PipelineMetrics

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 20  # how often a caught-up partition looks for new records
# After a poll that emptied a live partition's queue: every batch costs the dataflow a fixed
# amount, and polling again at once would hand it batches of a handful of events.
LIVE_POLL_MS = 10


def list_partitions(
    consumer_config: dict[str, Any], topic: str, timeout: float = 10.0
) -> list[int]:
    consumer = Consumer(consumer_config)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        msg = f"cannot read metadata of topic {topic!r}: {exc}"
        raise ServiceError(msg) from None
    finally:
        consumer.close()
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        msg = f"topic {topic!r} does not exist (run `keypulse kafka start` to create topics)"
        raise ServiceError(msg)
    return sorted(info.partitions)


class KafkaBatchSource(FixedPartitionedSource[SourceBatch, int]):
    def __init__(
        self,
        consumer_config: dict[str, Any],
        topic: str,
        *,
        batch_size: int = 5000,
        tick_ms: int = 100,
        clock: Clock = system_clock,
        partitions: list[int] | None = None,
        stop: threading.Event | None = None,
        metrics: PipelineMetrics | None = None,
        skip_header: str | None = None,
    ) -> None:
        self.consumer_config = consumer_config
        self.topic = topic
        self.batch_size = batch_size
        self.tick_ms = tick_ms
        self.clock = clock
        self._partitions = partitions
        self.stop = stop if stop is not None else threading.Event()
        self.metrics = metrics
        # Records carrying this header are read past, never handed over (low-volume topics
        # only: it costs a look at every record's headers).
        self.skip_header = skip_header

    def partitions(self) -> list[int]:
        if self._partitions is None:
            self._partitions = list_partitions(self.consumer_config, self.topic)
        return self._partitions

    def list_parts(self) -> list[str]:
        return [str(p) for p in self.partitions()]

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> KafkaBatchPartition:
        return KafkaBatchPartition(self, int(for_part), resume_state)


class KafkaBatchPartition(StatefulSourcePartition[SourceBatch, int]):
    def __init__(self, source: KafkaBatchSource, partition: int, resume_offset: int | None) -> None:
        self.source = source
        self.partition = partition
        self.next_offset = OFFSET_BEGINNING if resume_offset is None else resume_offset
        config = dict(source.consumer_config)
        for name, value in PREFETCH_SETTINGS.items():
            config.setdefault(name, value)
        self.consumer = Consumer(config)
        if self.next_offset == OFFSET_BEGINNING:
            self.next_offset = self._first_offset(source.topic, partition)
        self.tp = TopicPartition(source.topic, partition, self.next_offset)
        self.consumer.assign([self.tp])
        self._clock: Callable[[], float] = source.clock
        self._last_emit_ms = 0
        self._wait_ms = 0  # until the next poll, when the last one found nothing
        self._end_offset = -1  # the log end as the last fetch response said (metrics)
        logger.info(
            "reading %s[%s] from %s",
            source.topic,
            partition,
            "the beginning" if resume_offset is None else f"offset {resume_offset}",
        )

    def next_batch(self) -> list[SourceBatch]:
        if self.source.stop.is_set():
            raise StopIteration
        messages = self.consumer.consume(self.source.batch_size, timeout=0)
        now_ms = int(self._clock() * 1000)
        if any([m.error() is not None for m in messages]):  # rare: errors are not records
            messages = self._without_errors(messages)
        records = cast("list[tuple[int, bytes | None, bytes | None]]",  # records have offsets
                       [(m.offset(), m.key(), m.value()) for m in messages])
        self._wait_ms = 0
        if records:
            self.next_offset = records[-1][0] + 1
            if self.source.skip_header is not None:
                records = self._without_skipped(messages)
        caught_up = self._caught_up()
        if not records:
            if not caught_up:  # a backlog whose next fetch is on its way: look again soon
                self._wait_ms = 1
                return []
            self._wait_ms = IDLE_POLL_MS
            if now_ms - self._last_emit_ms < self.source.tick_ms:
                return []
        elif caught_up:  # live traffic: gather a few ms of it per batch, not a few events
            self._wait_ms = LIVE_POLL_MS
        self._last_emit_ms = now_ms
        if self.source.metrics is not None:  # per batch, not per event
            self.source.metrics.batch_at[self.partition] = now_ms / 1000
            self.source.metrics.caught_up[self.partition] = caught_up
            self.source.metrics.offsets[self.partition] = self.next_offset
            if self._end_offset >= 0:
                self.source.metrics.end_offsets[self.partition] = self._end_offset
        return [SourceBatch(self.partition, records, now_ms, caught_up)]

    def _first_offset(self, topic: str, partition: int) -> int:
        """The partition's first offset. Assigned "from the beginning", librdkafka looks it
        up only after a 500 ms timer at start; a start from its number fetches at once. An
        offset deleted meanwhile by retention is reset to the earliest (auto.offset.reset)."""
        try:
            low, _high = self.consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=5)
        except KafkaException:
            return OFFSET_BEGINNING  # the broker is not up yet: librdkafka retries
        return int(low)

    def _without_errors(self, messages: list[Message]) -> list[Message]:
        kept = []
        for message in messages:
            error = message.error()
            if error is None:
                kept.append(message)
            elif error.fatal():
                raise KafkaException(error)
            elif error.code() != KafkaError._PARTITION_EOF:
                logger.warning("%s[%s]: %s", self.source.topic, self.partition, error)
        return kept

    def _without_skipped(self, messages: list[Message]) -> list[tuple[int, bytes | None,
                                                                     bytes | None]]:
        skip = self.source.skip_header
        return [(cast("int", m.offset()), m.key(), m.value()) for m in messages
                if not any(header[0] == skip for header in m.headers() or ())]

    def _caught_up(self) -> bool:
        # Fetch responses carry the partition's end offset: until the first one arrives the
        # partition counts as behind (asking the broker blocked start-up 60 ms a partition).
        try:
            low, high = self.consumer.get_watermark_offsets(self.tp, cached=True)
        except KafkaException:
            return False
        if high < 0:
            return False
        self._end_offset = high
        return bool(self.next_offset >= high if self.next_offset >= 0 else high <= low)

    def next_awake(self) -> datetime | None:
        if self._wait_ms:
            return datetime.now(UTC) + timedelta(milliseconds=self._wait_ms)
        return None

    def snapshot(self) -> int:
        return self.next_offset

    def close(self) -> None:
        self.consumer.close()


class KafkaTopicsSource(FixedPartitionedSource[TopicBatch, int]):
    """Every partition of several topics as one input: one `KafkaBatchSource` per topic
    (keyed by its unprefixed name), each partition resumed from its own offset in the
    snapshots. Parts are named `<name>:<partition>`; items are `TopicBatch(name, batch)`."""

    def __init__(self, sources: dict[str, KafkaBatchSource]) -> None:
        self.sources = sources

    def list_parts(self) -> list[str]:
        return [f"{name}:{p}" for name, source in self.sources.items()
                for p in source.partitions()]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None
                   ) -> TopicPartitionReader:
        name, _, partition = for_part.rpartition(":")
        part = self.sources[name].build_part(step_id, partition, resume_state)
        return TopicPartitionReader(name, part)


class TopicPartitionReader(StatefulSourcePartition[TopicBatch, int]):
    """A `KafkaBatchPartition` whose batches say which topic they came from."""

    def __init__(self, name: str, part: KafkaBatchPartition) -> None:
        self.name = name
        self.part = part

    def next_batch(self) -> list[TopicBatch]:
        return [TopicBatch(self.name, batch) for batch in self.part.next_batch()]

    def next_awake(self) -> datetime | None:
        return self.part.next_awake()

    def snapshot(self) -> int:
        return self.part.snapshot()

    def close(self) -> None:
        self.part.close()

"""The pipeline's Kafka source against the real broker: where a partition starts reading,
tombstones, the per-run stop event and the liveness it records."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from core.clock import ManualClock
from core.kafka import admin_config, consumer_config, producer_config
from core.settings import Settings
from core.topics import USAGE_EVENTS
from pipeline.items import SourceBatch
from pipeline.kafka_source import KafkaBatchSource
from pipeline.metrics import PipelineMetrics

pytestmark = pytest.mark.integration


def _produce(settings: Settings, topic: str, count: int) -> None:
    producer = Producer(producer_config(settings))
    for n in range(count):
        producer.produce(topic, f"v{n}".encode(), b"k", partition=0)
    assert producer.flush(30) == 0


def _read(source: KafkaBatchSource, partition: int, resume: int | None,
          expected: int) -> tuple[list[int], int]:
    """The offsets one partition of the source reads (until `expected` of them), and the
    offset its snapshot then holds."""
    part = source.build_part("events", str(partition), resume)
    offsets: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while len(offsets) < expected and time.monotonic() < deadline:
            for batch in part.next_batch():
                offsets += [offset for offset, _key, _value in batch.records]
            time.sleep(0.01)
        return offsets, part.snapshot()
    finally:
        part.close()


def test_a_fresh_partition_starts_at_its_first_offset_after_retention(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings
    topic = settings.topic(USAGE_EVENTS)
    _produce(settings, topic, 10)
    # Records 0-3 are gone (as retention would have it): the log now starts at offset 4.
    admin = AdminClient(admin_config(settings))
    done = admin.delete_records([TopicPartition(topic, 0, 4)])
    for future in done.values():
        future.result(timeout=30)
    source = KafkaBatchSource(consumer_config(settings), topic, partitions=[0])
    assert _read(source, 0, None, 6) == ([4, 5, 6, 7, 8, 9], 10)
    # A snapshot's offset is where a resumed partition goes on.
    assert _read(source, 0, 7, 3) == ([7, 8, 9], 10)
    # A snapshot older than what retention kept goes on from the earliest record left.
    assert _read(source, 0, 2, 6) == ([4, 5, 6, 7, 8, 9], 10)


def _batches(source: KafkaBatchSource, expected: int) -> list[SourceBatch]:
    """Batches of partition 0 until `expected` records were read."""
    part = source.build_part("events", "0", None)
    batches: list[SourceBatch] = []
    try:
        deadline = time.monotonic() + 20
        while sum(len(b.records) for b in batches) < expected:
            assert time.monotonic() < deadline, "timed out"
            batches += part.next_batch()
            time.sleep(0.01)
        return batches
    finally:
        part.close()


def test_a_tombstone_stays_none(kafka_settings: Settings) -> None:
    topic = kafka_settings.topic(USAGE_EVENTS)
    producer = Producer(producer_config(kafka_settings))
    producer.produce(topic, None, b"user-1", partition=0)
    producer.produce(topic, b"", b"user-2", partition=0)
    producer.produce(topic, b"v", None, partition=0)
    assert producer.flush(30) == 0
    source = KafkaBatchSource(consumer_config(kafka_settings), topic, partitions=[0])
    records = [r for b in _batches(source, 3) for r in b.records]
    assert records == [(0, b"user-1", None), (1, b"user-2", b""), (2, None, b"v")]


def test_each_run_stops_on_its_own_event(kafka_settings: Settings) -> None:
    topic = kafka_settings.topic(USAGE_EVENTS)
    config = consumer_config(kafka_settings)
    stop, other = threading.Event(), threading.Event()
    stopped = KafkaBatchSource(config, topic, partitions=[0], stop=stop)
    going = KafkaBatchSource(config, topic, partitions=[0], stop=other)
    default = KafkaBatchSource(config, topic, partitions=[0])
    parts = [s.build_part("events", "0", None) for s in (stopped, going, default)]
    try:
        stop.set()
        with pytest.raises(StopIteration):
            parts[0].next_batch()
        assert parts[1].next_batch() is not None  # another run's source goes on
        assert default.stop is not stop and not default.stop.is_set()
        assert parts[2].next_batch() is not None
    finally:
        for part in parts:
            part.close()


def test_a_source_with_metrics_records_each_batch(kafka_settings: Settings) -> None:
    settings = kafka_settings
    topic = settings.topic(USAGE_EVENTS)
    _produce(settings, topic, 5)
    clock = ManualClock(1_700_000_123.5)
    counters = PipelineMetrics()
    source = KafkaBatchSource(consumer_config(settings), topic, partitions=[0], clock=clock,
                              metrics=counters)
    batches = _batches(source, 5)
    assert counters.batch_at == {0: 1_700_000_123.5}
    assert counters.caught_up == {0: batches[-1].caught_up}
    # the position and the log end, for the system snapshot's lag and rates (core/system.py)
    assert counters.offsets == {0: 5}
    assert counters.end_offsets == {0: 5}

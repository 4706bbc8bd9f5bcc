"""The pipeline's Kafka source against the real broker: where a partition starts reading."""

from __future__ import annotations

import time

from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from core.kafka import admin_config, consumer_config, producer_config
from core.settings import Settings
from core.topics import USAGE_EVENTS
from pipeline.kafka_source import KafkaBatchSource


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

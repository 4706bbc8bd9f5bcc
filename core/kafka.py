"""Kafka client configuration: the one place that knows how keypulse talks to the broker.

Producers use the murmur2 partitioner, the same as the Java client, so that a
`user_id` key lands on the same partition whichever client produced it; the
dataflow and the bridge rely on "one user, one partition". `partition_for` computes that
partition (the bridge needs it to read and write resume cursors before it has seen any
message of the user).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from core.settings import Settings


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000,
    }
    config.update(overrides)
    return config


# For consumers that read a backlog (the dataflow's source): prefetch at most 8 MB per
# partition (RSS), and fetch again 5 ms after the queue drops under that. librdkafka's default
# waits 1 s (fetch.queue.backoff.ms) once a queue has filled, which starved the partitions and
# capped reading at about 140k events/s on a 2-core machine.
PREFETCH_SETTINGS: dict[str, Any] = {"queued.max.messages.kbytes": 8192,
                                     "fetch.queue.backoff.ms": 5}


def consumer_config(
    settings: Settings, group_id: str | None = None, **overrides: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id or "keypulse-reader",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    }
    config.update(overrides)
    return config


def admin_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    config.update(overrides)
    return config


def produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes | None = None,
    *,
    headers: list[tuple[str, str | bytes | None]] | None = None,
    on_delivery: Callable[..., None] | None = None,
    wait_seconds: float = 0.05,
) -> None:
    """Produce, waiting for deliveries to drain while the local queue is full (never drops)."""
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(wait_seconds)


# -- the partitioner (Kafka's murmur2, as the Java client and librdkafka's murmur2_random) --

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 (seed 0x9747b28c) as an unsigned int."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    end = length - length % 4
    for i in range(0, end, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    extra = length % 4
    if extra == 3:
        h ^= data[end + 2] << 16
    if extra >= 2:
        h ^= data[end + 1] << 8
    if extra >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of `key` among `partitions` (Java's `toPositive(murmur2) % n`)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions

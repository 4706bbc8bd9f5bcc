"""Kafka client configuration: the one place that knows how keypulse talks to the broker.

Producers use the murmur2 partitioner, the same as the Java client, so that a
`user_id` key lands on the same partition whichever client produced it; the
dataflow and the bridge rely on "one user, one partition".
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

"""Kafka client configuration: the one place that knows how keypulse talks to the broker.

Producers use the murmur2 partitioner, the same as the Java client, so that a
`user_id` key lands on the same partition whichever client produced it; the
dataflow and the bridge rely on "one user, one partition". `partition_for` computes that
partition (the bridge needs it to read and write resume cursors before it has seen any
message of the user).

Every client config carries the broker's security settings (`_security`: the protocol, SASL
credentials, the CA that signs the brokers' certificates, hostname checking), so no client
anywhere in keypulse can reach a TLS or SASL broker without them (docs/kafka-security.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from core.errors import ConfigError
from core.settings import Settings


def _security(settings: Settings) -> dict[str, Any]:
    """The security part of every client config, from the `kafka_security_*`, `kafka_sasl_*`
    and `kafka_ssl_*` settings; ConfigError (one line) for a SASL protocol without
    credentials or a CA file that is not there."""
    protocol = settings.kafka_security_protocol
    config: dict[str, Any] = {"security.protocol": protocol}
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password.get_secret_value()
        if not settings.kafka_sasl_username or not password:
            msg = (
                f"KEYPULSE_KAFKA_SECURITY_PROTOCOL={protocol} needs KEYPULSE_KAFKA_SASL_USERNAME "
                "and KEYPULSE_KAFKA_SASL_PASSWORD (or KEYPULSE_KAFKA_SASL_PASSWORD_FILE)"
            )
            raise ConfigError(msg)
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = password
    if protocol.endswith("SSL"):
        ca = settings.kafka_ssl_ca_file
        if ca is not None:
            if not ca.is_file():
                msg = f"KEYPULSE_KAFKA_SSL_CA_FILE={ca} is not a readable file"
                raise ConfigError(msg)
            config["ssl.ca.location"] = str(ca)
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if settings.kafka_ssl_check_hostname else "none"
        )
    return config


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
        **_security(settings),
    }
    config.update(overrides)
    return config


# For consumers that read a backlog (the dataflow's source): prefetch at most 8 MB per
# partition (RSS), and fetch again 5 ms after the queue drops under that. librdkafka's default
# waits 1 s (fetch.queue.backoff.ms) once a queue has filled, which starved the partitions and
# capped reading at about 140k events/s on a 2-core machine.
PREFETCH_SETTINGS: dict[str, Any] = {
    "queued.max.messages.kbytes": 8192,
    "fetch.queue.backoff.ms": 5,
}


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
        **_security(settings),
    }
    config.update(overrides)
    return config


def admin_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap, **_security(settings)}
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

"""Producing client events to Kafka: one shared producer, polled by a daemon thread.

`produce` never blocks the event loop: librdkafka queues the message and a delivery
failure is logged and counted. A full local queue raises `Unavailable`, which the client
sees as an `unavailable` error frame.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from confluent_kafka import KafkaError, Producer

from core.errors import ServiceError
from core.kafka import producer_config
from core.settings import Settings
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)


class Unavailable(ServiceError):
    """Kafka cannot take the message now."""


class Sink(Protocol):
    def produce(self, topic: str, key: bytes, value: bytes,
                headers: list[tuple[str, bytes]] | None = None) -> None: ...


class BridgeProducer:
    def __init__(self, settings: Settings, stats: BridgeStats) -> None:
        self.stats = stats
        self._producer = Producer(producer_config(
            settings, **{"linger.ms": 2, "client.id": "keypulse-ws"}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ws-kafka-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        remaining = self._producer.flush(timeout)
        if remaining:
            logger.warning("%d produced messages not delivered at shutdown", remaining)

    def produce(self, topic: str, key: bytes, value: bytes,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        try:
            self._producer.produce(topic, value=value, key=key,
                                   headers=headers,  # type: ignore[arg-type]
                                   on_delivery=self._delivered)
        except BufferError as exc:
            self.stats.produce_errors += 1
            msg = "kafka producer queue is full"
            raise Unavailable(msg) from exc
        except Exception as exc:  # KafkaException: unknown topic, message too large...
            self.stats.produce_errors += 1
            msg = f"kafka refused the message: {exc}"
            raise Unavailable(msg) from exc

    def _delivered(self, error: KafkaError | None, _msg: Any) -> None:
        if error is not None:
            self.stats.produce_errors += 1
            logger.warning("delivery failed: %s", error)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

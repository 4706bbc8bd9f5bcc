"""Dead letters: what the DLQ record of a refused input or output looks like, and a writer
that always gets it onto `usage.events.dlq`.

A dead letter keeps the original key and value bytes; why and where travel in headers
(`keypulse.reason`, `keypulse.source.*`, and for storage failures `keypulse.error` and
`keypulse.table`). A record too large for the topic is stored truncated, with its original
size and SHA-256 in headers; a tombstone stays a tombstone; a record the producer refuses even
then is logged and counted (`dlq_failed`), never raised into the dataflow.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from pipeline.items import DeadLetter
from pipeline.metrics import PipelineMetrics

logger = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]

DEFAULT_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's message.max.bytes
# What a record costs beyond its key, value and header bytes (librdkafka counts a v2 record's
# framing against message.max.bytes); generous, so a fitted dead letter is never refused.
_RECORD_OVERHEAD = 1024
_KEY_MAX_BYTES = 1024  # a dead letter's key, when the key alone would crowd out the value
ERROR_MAX_CHARS = 500  # of an engine's error in `keypulse.error`
_DLQ_ATTEMPTS = 3


class DeadLetterWriter:
    """Produces dead letters to one topic with a shared (thread-safe) producer."""

    def __init__(self, producer: Producer, topic: str, metrics: PipelineMetrics,
                 max_message_bytes: int = DEFAULT_MESSAGE_MAX_BYTES) -> None:
        self.producer = producer
        self.topic = topic
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes

    def write(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        """Produce to the DLQ, which always takes the record: too large → truncated (with the
        original size and SHA-256 in headers); refused even then → logged and counted, never
        raised. A None value is produced as a tombstone."""
        limit = self.max_message_bytes
        for _ in range(_DLQ_ATTEMPTS):
            fitted_key, fitted, fitted_headers = fit_dead_letter(key, value, headers, limit)
            try:
                self._produce(fitted_key, fitted, fitted_headers)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    limit //= 2  # the overhead was larger than reckoned: leave more room
                logger.warning("DLQ produce failed, trying again: %s", first_line(exc))
                self.producer.poll(0.05)
                continue
            if any(name == "keypulse.truncated" for name, _ in fitted_headers):
                self.metrics.add(dlq_truncated=1)
            return
        self._lost(f"refused {_DLQ_ATTEMPTS} times", headers)

    def _produce(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value, key, headers=headers,
                                      on_delivery=self._delivered)
                return
            except BufferError:  # the local queue is full: wait for deliveries, never drop
                self.producer.poll(0.05)

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._lost(f"not delivered: {err.str()}", msg.headers() or [])

    def _lost(self, why: str, headers: Headers) -> None:
        self.metrics.add(dlq_failed=1)
        logger.error("DEAD LETTER LOST (%s) %s: %s", self.topic, why,
                     {name: value for name, value in headers if name != "keypulse.error"})


def dead_letter_headers(dead: DeadLetter, source_topic: str) -> Headers:
    """The DLQ keeps the original key and value bytes; why and where go in headers."""
    return [
        ("keypulse.reason", dead.reason.encode()),
        ("keypulse.source.topic", source_topic.encode()),
        ("keypulse.source.partition", str(dead.partition).encode()),
        ("keypulse.source.offset", str(dead.offset).encode()),
    ]


def fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: Headers, max_message_bytes: int
) -> tuple[bytes | None, bytes | None, Headers]:
    """Key, value and headers that fit under `max_message_bytes` (the producer's
    message.max.bytes). Within it, all three come back as they are; else the value is
    truncated and headers `keypulse.original.size`, `keypulse.original.sha256` (of the full
    value) and `keypulse.truncated: 1` say so (a key longer than 1 KiB is cut as well, with
    `keypulse.original.key.size`)."""
    if _record_size(key, value, headers) <= max_message_bytes:
        return key, value, headers
    fitted_headers = list(headers)
    if key is not None and len(key) > _KEY_MAX_BYTES:
        fitted_headers.append(("keypulse.original.key.size", str(len(key)).encode()))
        key = key[:_KEY_MAX_BYTES]
    if value is not None and _record_size(key, value, fitted_headers) > max_message_bytes:
        fitted_headers += [
            ("keypulse.original.size", str(len(value)).encode()),
            ("keypulse.original.sha256", hashlib.sha256(value).hexdigest().encode()),
            ("keypulse.truncated", b"1"),
        ]
        room = max_message_bytes - _record_size(key, b"", fitted_headers)
        value = value[: max(room, 0)]
    return key, value, fitted_headers


def _record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """What a record counts against message.max.bytes, reckoned generously."""
    return len(key or b"") + len(value or b"") + _headers_size(headers) + _RECORD_OVERHEAD


def _headers_size(headers: Headers) -> int:
    """Header bytes as a record carries them, with room for their length varints."""
    return sum(len(name) + len(value or b"") + 10 for name, value in headers)


def first_line(exc: BaseException) -> str:
    """The first line of an engine's (or client's) error: what a DLQ header and a log show."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""The DLQ always takes a record: `fit_dead_letter` keeps every record under the producer's
message.max.bytes, and a record the producer refuses even then is counted, never raised."""

from __future__ import annotations

import hashlib

from confluent_kafka import Producer
from hypothesis import given
from hypothesis import strategies as st

from pipeline.dead_letters import DeadLetterWriter, Headers, _headers_size, fit_dead_letter
from pipeline.metrics import PipelineMetrics

HEADERS: Headers = [("keypulse.reason", b"invalid"), ("keypulse.source.topic", b"usage.events"),
                    ("keypulse.source.partition", b"3"), ("keypulse.source.offset", b"12345")]


def _size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    return len(key or b"") + len(value or b"") + _headers_size(headers)


@given(key_size=st.integers(0, 5_000), value_size=st.integers(0, 300_000),
       limit=st.integers(8_000, 400_000), tombstone=st.booleans())
def test_a_fitted_record_is_under_the_limit_and_says_what_it_lost(
    key_size: int, value_size: int, limit: int, tombstone: bool
) -> None:
    key = b"k" * key_size
    value = None if tombstone else (bytes(range(251)) * (value_size // 251 + 1))[:value_size]
    fitted_key, fitted, headers = fit_dead_letter(key, value, HEADERS, limit)
    assert _size(fitted_key, fitted, headers) < limit
    named = dict(headers)
    if fitted is value and fitted_key is key:  # it fitted: untouched
        assert headers == HEADERS
        return
    assert headers[: len(HEADERS)] == HEADERS
    if value is None:
        assert fitted is None  # a tombstone stays a tombstone
        assert "keypulse.truncated" not in named
    elif len(fitted or b"") == len(value):  # cutting the key was enough
        assert fitted == value
        assert "keypulse.truncated" not in named
    else:
        assert fitted is not None and value.startswith(fitted)
        assert named["keypulse.truncated"] == b"1"
        assert named["keypulse.original.size"] == str(len(value)).encode()
        assert named["keypulse.original.sha256"] == hashlib.sha256(value).hexdigest().encode()
    if fitted_key != key:
        assert key.startswith(fitted_key or b"")
        assert named["keypulse.original.key.size"] == str(key_size).encode()


def test_the_reported_million_byte_value_fits_the_default_limit() -> None:
    value = b"v" * 999_950
    key, fitted, headers = fit_dead_letter(b"user-1", value, HEADERS, 1_000_000)
    assert fitted is not None and 990_000 < len(fitted) < len(value)
    assert _size(key, fitted, headers) < 1_000_000


def test_a_record_the_dlq_refuses_is_counted_not_raised() -> None:
    """Headers alone over message.max.bytes: librdkafka refuses every attempt."""
    metrics = PipelineMetrics()
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": 1000})
    writer = DeadLetterWriter(producer, "usage.events.dlq", metrics, max_message_bytes=1000)
    writer.write(b"u", b"v", [("keypulse.reason", b"x" * 5000)])
    writer.write(b"u", None, [("keypulse.reason", b"x" * 5000)])
    assert metrics.dlq_failed == 2
    assert metrics.dlq_truncated == 0

"""Storage faults are one batch's problem, and the DLQ always takes a record (issue 10), with
the real engine and broker: a spread of event times no insert can refuse, an engine error
dead-lettered after its attempts while the next batch goes in, an oversized dead letter
stored truncated with its size and SHA-256, a tombstone kept as a tombstone."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Message, TopicPartition
from msgspec.structs import astuple

from core import topics
from core.kafka import consumer_config, producer_config
from core.outputs import rule_row
from core.settings import Settings
from infra.clickhouse.migrate import migrate
from pipeline.items import DeadLetter, EventRows, PartitionOutput
from pipeline.metrics import PipelineMetrics
from pipeline.rows import encode_rows
from pipeline.sinks import OutputPartition, OutputSink
from pipeline.windows import WindowAcc, close_window
from schemas.alerts import AlertRule, Metric, Op
from schemas.events import decode_event
from schemas.stats import StatsRecord
from tests.integration.harness import embedded

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
NOW = int(time.time()) * 1000
W0 = NOW // 10_000 * 10_000 - 3_600_000  # a window an hour ago


def _events(times_ms: list[int], first_offset: int = 0) -> EventRows:
    """One event of user "u" at each time, encoded as the processor encodes its rows."""
    rows = []
    for n, ts in enumerate(times_ms):
        event = decode_event(json.dumps({
            "event_id": f"e{first_offset + n}", "ts": ts, "user_id": "u", "api_key_id": "k",
            "service": "openai", "status_code": 200, "latency_ms": 1.0}).encode())
        rows.append((*astuple(event), ts, False, 2, first_offset + n, NOW))
    return EventRows(len(rows), encode_rows(rows), min(times_ms))


def _stats(start_ms: int) -> StatsRecord:
    acc = WindowAcc()
    acc.latencies.append(1.0)
    acc.statuses.append(200)
    return close_window("u", "openai", start_ms, 10_000, acc)


def _output(*, rows: EventRows | None = None, stats: list[StatsRecord] | None = None,
            dead: list[DeadLetter] | None = None) -> PartitionOutput:
    out = PartitionOutput.empty(0)
    if rows is not None:
        out.event_rows.append(rows)
    out.stats.extend(stats or [])
    out.dead_letters.extend(dead or [])
    return out


@pytest.fixture
def engine(kafka_settings: Settings, tmp_path: Path) -> Iterator[Client]:
    with embedded(tmp_path / "ch") as client:
        migrate(client, kafka_settings, progress=lambda _line: None)
        yield client


def _partition(settings: Settings, client: Client, metrics: PipelineMetrics) -> OutputPartition:
    """A sink partition that writes only when told (a snapshot), retrying without waiting."""
    sink = OutputSink(lambda: client, producer_config(settings), settings.topic,
                      settings.clickhouse_database, max_rows=10**9, max_age_s=3600,
                      insert_attempts=3, retry_backoff_s=0, metrics=metrics)
    return sink.build_part("output", "writer-0", None)


def _read(settings: Settings, topic: str, count: int, timeout: float = 20) -> list[Message]:
    """The first `count` records of a topic (every partition, from the start)."""
    consumer = Consumer(consumer_config(settings, group_id=f"test-{topic}"))
    name = settings.topic(topic)
    parts = consumer.list_topics(name, timeout=10).topics[name].partitions
    consumer.assign([TopicPartition(name, p, 0) for p in parts])
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += [m for m in consumer.consume(100, timeout=0.2) if m.error() is None]
    consumer.close()
    return got


def _headers(message: Message) -> dict[str, bytes]:
    return {name: value or b"" for name, value in message.headers() or []}


def _count(client: Client, db: str) -> int:
    return int(client.query(f"SELECT count() FROM {db}.usage_events FINAL").result_rows[0][0])


def test_any_spread_of_event_times_goes_in_and_the_sink_goes_on(
    kafka_settings: Settings, engine: Client
) -> None:
    db = kafka_settings.clickhouse_database
    metrics = PipelineMetrics()
    part = _partition(kafka_settings, engine, metrics)
    # 101 distinct days (once > 100 daily partitions: TOO_MANY_PARTS, the dataflow stopped),
    # then 150 distinct months: storage must not rely on the processor's admission.
    days = [NOW + d * DAY_MS for d in range(101)]
    months = [NOW + m * 31 * DAY_MS for m in range(150)]
    try:
        part.write_batch([_output(rows=_events(days))])
        part.snapshot()
        part.write_batch([_output(rows=_events(months, first_offset=1000))])
        part.snapshot()
        part.write_batch([_output(rows=_events([NOW], first_offset=5000))])
        part.snapshot()
    finally:
        part.close()
    assert _count(engine, db) == 101 + 150 + 1
    assert metrics.storage_dead_lettered == 0
    assert metrics.insert_retries == 0
    assert metrics.event_rows_written == 252
    partitions = engine.query(
        f"SELECT uniqExact(partition) FROM system.parts WHERE database = '{db}' "
        "AND table = 'usage_events' AND active").result_rows[0][0]
    assert partitions == len({time.strftime("%Y%m", time.gmtime(t / 1000))
                              for t in days + months})


def test_an_engine_error_dead_letters_the_batch_after_its_attempts(
    kafka_settings: Settings, engine: Client
) -> None:
    db = kafka_settings.clickhouse_database
    metrics = PipelineMetrics()
    part = _partition(kafka_settings, engine, metrics)
    try:
        engine.command(f"RENAME TABLE {db}.usage_events_rows TO {db}.usage_events_rows_away")
        part.write_batch([_output(rows=_events([NOW, NOW + 1, NOW + 2]))])
        part.snapshot()  # would raise if the writer had failed
        assert _count(engine, db) == 0
        engine.command(f"RENAME TABLE {db}.usage_events_rows_away TO {db}.usage_events_rows")
        part.write_batch([_output(rows=_events([NOW + 3], first_offset=3))])
        part.snapshot()
    finally:
        part.close()
    assert _count(engine, db) == 1  # the next batch is fine
    assert (metrics.insert_retries, metrics.storage_dead_lettered) == (2, 3)
    dead = _read(kafka_settings, topics.USAGE_EVENTS_DLQ, 3)
    assert len(dead) == 3
    for message in dead:
        headers = _headers(message)
        assert headers["keypulse.reason"] == b"storage_error"
        assert b"usage_events_rows" in headers["keypulse.error"]
        assert b"\n" not in headers["keypulse.error"]
        assert headers["keypulse.table"] == f"{db}.usage_events_rows".encode()
        assert headers["keypulse.source.topic"] == kafka_settings.topic(
            topics.USAGE_EVENTS).encode()
        assert headers["keypulse.source.partition"] == b"2"
        assert message.key() == b"u"
        event = decode_event(message.value())  # re-drivable to usage.events as it is
        assert headers["keypulse.source.offset"] == event.event_id[1:].encode()
    assert sorted(decode_event(m.value()).ts_ms for m in dead) == [NOW, NOW + 1, NOW + 2]


def test_stats_the_engine_refuses_are_dead_lettered_and_not_published(
    kafka_settings: Settings, engine: Client
) -> None:
    """A model field without its column fails loudly: here `schema_version`, dropped."""
    db = kafka_settings.clickhouse_database
    metrics = PipelineMetrics()
    part = _partition(kafka_settings, engine, metrics)
    try:
        engine.command(f"ALTER TABLE {db}.usage_stats DROP COLUMN schema_version")
        part.write_batch([_output(stats=[_stats(W0)])])
        part.snapshot()
        engine.command(f"ALTER TABLE {db}.usage_stats ADD COLUMN schema_version UInt8 DEFAULT 1")
        part.write_batch([_output(stats=[_stats(W0 + 10_000)])])
        part.snapshot()
    finally:
        part.close()
    stored = engine.query(f"SELECT toUnixTimestamp64Milli(window_start) "
                          f"FROM {db}.usage_stats FINAL").result_rows
    assert stored == [(W0 + 10_000,)]
    published = _read(kafka_settings, topics.USAGE_STATS, 2, timeout=5)
    assert [json.loads(m.value())["window_start"] for m in published] == [
        msgspec.json.decode(msgspec.json.encode(_stats(W0 + 10_000)))["window_start"]]
    (dead,) = _read(kafka_settings, topics.USAGE_EVENTS_DLQ, 1)
    headers = _headers(dead)
    assert headers["keypulse.reason"] == b"storage_error"
    assert b"schema_version" in headers["keypulse.error"]
    assert headers["keypulse.table"] == f"{db}.usage_stats".encode()
    assert headers["keypulse.output.topic"] == kafka_settings.topic(topics.USAGE_STATS).encode()
    assert msgspec.json.decode(dead.value(), type=StatsRecord) == _stats(W0)
    assert (metrics.stats_unpublished, metrics.stats_rows_written) == (1, 1)


def test_the_dlq_takes_an_oversized_record_truncated_and_a_tombstone_as_one(
    kafka_settings: Settings, engine: Client
) -> None:
    metrics = PipelineMetrics()
    part = _partition(kafka_settings, engine, metrics)
    big = bytes(range(256)) * (999_950 // 256) + b"x" * (999_950 % 256)
    letters = [
        DeadLetter(big, b"u-big", "too_large", 1, 10),
        DeadLetter(None, b"u-tomb", "tombstone", 1, 11),
        DeadLetter(b"{}", b"u-small", "invalid", 1, 12),
    ]
    try:
        part.write_batch([_output(dead=letters)])
        part.snapshot()
    finally:
        part.close()
    by_key: dict[bytes | None, Any] = {
        m.key(): m for m in _read(kafka_settings, topics.USAGE_EVENTS_DLQ, 3)}
    assert set(by_key) == {b"u-big", b"u-tomb", b"u-small"}

    truncated = by_key[b"u-big"]
    headers = _headers(truncated)
    assert headers["keypulse.reason"] == b"too_large"
    assert headers["keypulse.truncated"] == b"1"
    assert headers["keypulse.original.size"] == b"999950"
    assert headers["keypulse.original.sha256"] == hashlib.sha256(big).hexdigest().encode()
    value = truncated.value()
    assert 900_000 < len(value) < 999_950
    assert big.startswith(value)
    header_bytes = sum(len(k) + len(v) for k, v in headers.items())
    assert len(value) + header_bytes + len(b"u-big") < 1_000_000

    tombstone = by_key[b"u-tomb"]
    assert tombstone.value() is None  # a tombstone, not b""
    assert _headers(tombstone)["keypulse.reason"] == b"tombstone"

    small = by_key[b"u-small"]
    assert small.value() == b"{}"
    assert "keypulse.truncated" not in _headers(small)
    assert (metrics.dlq_truncated, metrics.dlq_failed) == (1, 0)


def test_rule_rows_the_engine_refuses_are_dead_lettered_by_rule(
    kafka_settings: Settings, engine: Client
) -> None:
    db = kafka_settings.clickhouse_database
    metrics = PipelineMetrics()
    part = _partition(kafka_settings, engine, metrics)
    rule = AlertRule(rule_id="r1", user_id="u", name="errors", metric=Metric.ERROR_RATE,
                     op=Op.GT, threshold=0.5, version=2)
    try:
        engine.command(f"RENAME TABLE {db}.alert_rules TO {db}.alert_rules_away")
        out = PartitionOutput.empty()
        out.rule_rows.append(rule_row(rule, deleted=False, updated_ms=NOW))
        part.write_batch([out])
        part.snapshot()
        engine.command(f"RENAME TABLE {db}.alert_rules_away TO {db}.alert_rules")
        out = PartitionOutput.empty()
        out.rule_rows.append(rule_row(rule, deleted=True, updated_ms=NOW + 1))
        part.write_batch([out])
        part.snapshot()
    finally:
        part.close()
    stored = engine.query(f"SELECT rule_id, version, is_deleted, schema_version "
                          f"FROM {db}.alert_rules").result_rows
    assert stored == [("r1", 2, 1, 1)]
    (dead,) = _read(kafka_settings, topics.USAGE_EVENTS_DLQ, 1)
    assert dead.key() == b"r1"
    assert _headers(dead)["keypulse.table"] == f"{db}.alert_rules".encode()
    named = json.loads(dead.value())
    assert (named["rule_id"], named["is_deleted"], named["version"]) == ("r1", 0, 2)
    assert metrics.storage_dead_lettered == 1

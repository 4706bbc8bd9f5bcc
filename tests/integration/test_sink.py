"""The sink's ordering rule with the real engine and broker: a stats row is written only after
the events of its window, and it does not wait for rows of later windows."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from msgspec.structs import astuple

from core import topics
from core.kafka import consumer_config, producer_config
from core.settings import Settings
from infra.clickhouse.migrate import migrate
from pipeline.items import EventRows, PartitionOutput
from pipeline.rows import encode_rows
from pipeline.sinks import OutputSink
from pipeline.windows import WindowAcc, close_window
from schemas.events import decode_event
from tests.integration.harness import embedded

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000
W0 = int(time.time()) // 10 * WINDOW_MS - 3_600_000  # a window start an hour ago (epoch ms)
W1 = W0 + WINDOW_MS


def _rows(window_ms: int, count: int) -> EventRows:
    """`count` events of one user in the window starting at `window_ms`, encoded as rows."""
    rows = []
    for n in range(count):
        ts = window_ms + n
        event = decode_event(json.dumps({
            "event_id": f"e{ts}", "ts": ts, "user_id": "u", "api_key_id": "k",
            "service": "openai", "status_code": 200, "latency_ms": 1.0}).encode())
        rows.append((*astuple(event), ts, False, 0, ts - W0, W0))
    return EventRows(count, encode_rows(rows), window_ms)


def _output(rows: list[EventRows], closed: list[int]) -> PartitionOutput:
    out = PartitionOutput.empty(0)
    out.event_rows.extend(rows)
    for start in closed:
        acc = WindowAcc()
        acc.latencies.append(1.0)
        acc.statuses.append(200)
        out.stats.append(close_window("u", "openai", start, WINDOW_MS, acc))
    return out


def test_stats_wait_for_their_windows_events_only(kafka_settings: Settings,
                                                   tmp_path: Path) -> None:
    settings = kafka_settings
    db = settings.clickhouse_database
    with embedded(tmp_path / "ch") as client:
        migrate(client, settings)
        # Batches close only on stats or a snapshot here: no size or age limit interferes.
        sink = OutputSink(lambda: client, producer_config(settings), settings.topic, db,
                          max_rows=10**9, max_age_s=3600)
        part = sink.build_part("output", "writer-0", None)
        try:
            part.write_batch([_output([_rows(W1, 3)], [])])
            assert part.buffered_rows == 3

            # W0 closes; the buffered rows are all in W1: they stay buffered.
            part.write_batch([_output([], [W0])])
            assert part.buffered_rows == 3

            # W1 closes: its rows are submitted ahead of its stats row.
            part.write_batch([_output([_rows(W1 + WINDOW_MS, 2)], [W1])])
            assert part.buffered_rows == 0
            part.jobs.join()
            counted = client.query(
                f"SELECT count() FROM {db}.usage_events FINAL "
                f"WHERE ts < fromUnixTimestamp64Milli({W1 + WINDOW_MS}, 'UTC')").result_rows
            assert counted == [(3,)]
        finally:
            part.close()
        stats = client.query(f"SELECT toUnixTimestamp64Milli(window_start) "
                             f"FROM {db}.usage_stats FINAL ORDER BY window_start").result_rows
        assert stats == [(W0,), (W1,)]
        events = client.query(f"SELECT count() FROM {db}.usage_events FINAL").result_rows
        assert events == [(5,)]  # close() drains the last two rows as well

    consumer = Consumer(consumer_config(settings, group_id="test-sink"))
    name = settings.topic(topics.USAGE_STATS)
    parts = consumer.list_topics(name, timeout=10).topics[name].partitions
    consumer.assign([TopicPartition(name, p, 0) for p in parts])
    published = []
    for _ in range(50):
        published += [json.loads(m.value()) for m in consumer.consume(10, timeout=0.2)
                      if m.error() is None]
        if len(published) >= 2:
            break
    consumer.close()
    starts = sorted(datetime.fromisoformat(r["window_start"]).timestamp() * 1000
                    for r in published)
    assert starts == [W0, W1]  # published once in ClickHouse

"""`keypulse dlq inspect|replay` against the real broker, and a real pipeline that dead-letters
events, counts what replay brings back exactly once, and sees nothing more on a second replay
(docs/dead-letters.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from core import topics
from core.kafka import admin_config, producer_config
from core.settings import Settings
from keypulse.dlq import REPLAY_ORIGIN, REPLAYED, DeadLetterRecord, read_topic
from pipeline.dead_letters import dead_letter_headers
from pipeline.items import DeadLetter
from tests.integration.harness import REPO, PipelineProcess, TopicReader, embedded, produce
from tests.integration.truth import STATS_FIELDS, assert_windows_equal, expected_windows

pytestmark = pytest.mark.integration

WINDOW_MS = 2000
FAST_WINDOWS = {"KEYPULSE_WINDOW_SECONDS": "2", "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1"}


@pytest.fixture
def dlq_settings(kafka_settings: Settings) -> Iterator[Settings]:
    """The test's topics; the replay ledger (created by the first replay) is deleted after."""
    yield kafka_settings
    admin = AdminClient(admin_config(kafka_settings))
    ledger = kafka_settings.topic(REPLAYED)
    if ledger in admin.list_topics(timeout=10).topics:
        admin.delete_topics([ledger])[ledger].result(timeout=30)


def keypulse(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`keypulse <args>` in a child process with the test's settings."""
    return subprocess.run(
        [sys.executable, "-m", "keypulse.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            "KEYPULSE_DEV": "1",
            "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix,
            **env,
        },
    )


def summary(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def replayed_records(settings: Settings) -> list[DeadLetterRecord]:
    """The records on usage.events that carry a replay origin."""
    return [
        r
        for r in read_topic(settings, settings.topic(topics.USAGE_EVENTS))
        if r.header(REPLAY_ORIGIN) is not None
    ]


def event(event_id: str, ts: int, status: int = 200, latency: float = 10.0) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "ts": ts,
        "user_id": "skewed",
        "api_key_id": "k1",
        "service": "openai",
        "status_code": status,
        "latency_ms": latency,
    }


def test_dead_letters_replayed_are_counted_once_and_a_second_replay_sends_nothing(
    dlq_settings: Settings, tmp_path: Path
) -> None:
    settings = dlq_settings
    # Run 1 admits no event ahead of wall time (skew 0): five events 60 s ahead are dead
    # letters `ts_in_future`. The DLQ then gets a second copy of one (what a crash replay of
    # the pipeline writes): same origin headers.
    future = (int(time.time() * 1000) + 60_000) // WINDOW_MS * WINDOW_MS
    events = [
        event(
            f"f{i}",
            future + 100 * i,
            status=(200, 200, 404, 500, 200)[i],
            latency=(10.0, 20.0, 35.5, 80.0, 12.25)[i],
        )
        for i in range(5)
    ]
    produce(settings, topics.USAGE_EVENTS, [(b"skewed", json.dumps(e).encode()) for e in events])
    pipeline = PipelineProcess(
        settings, tmp_path, 1.0, **FAST_WINDOWS, KEYPULSE_MAX_CLOCK_SKEW_SECONDS="0"
    )
    pipeline.start()
    dlq = TopicReader(settings, topics.USAGE_EVENTS_DLQ)
    try:
        dead = dlq.read_until(lambda ms: len(ms) >= 5, timeout=90, check=pipeline.assert_alive)
    finally:
        assert pipeline.stop() == 0
        dlq.close()
    assert {DeadLetterRecord.from_message(m).reason.partition(":")[0] for m in dead} == {
        "ts_in_future"
    }
    copy = dead[2]
    producer = Producer(producer_config(settings))
    producer.produce(copy.topic(), copy.value(), copy.key(), headers=copy.headers())
    assert producer.flush(30) == 0

    inspected = keypulse(settings, "dlq", "inspect", "--limit", "1")
    assert inspected.returncode == 0, inspected.stderr
    assert "6 records" in inspected.stdout
    assert "       6  ts_in_future" in inspected.stdout
    assert "keypulse.source.offset:" in inspected.stdout

    # While the clock is still wrong (skew 0 here too) nothing goes back.
    assert summary(keypulse(settings, "dlq", "replay", KEYPULSE_MAX_CLOCK_SKEW_SECONDS="0")) == (
        "read 6, distinct 5, replayed 0, skipped 6 (duplicate: 1, still ts_in_future: 5)"
    )
    dry = keypulse(settings, "dlq", "replay", "--dry-run")
    assert summary(dry) == "read 6, distinct 5, would replay 5, skipped 1 (duplicate: 1)"
    assert sum(line.startswith("would replay ") for line in dry.stdout.splitlines()) == 5
    assert replayed_records(settings) == []

    assert summary(keypulse(settings, "dlq", "replay")) == (
        "read 6, distinct 5, replayed 5, skipped 1 (duplicate: 1)"
    )
    replayed = replayed_records(settings)
    origins = sorted(r.header(REPLAY_ORIGIN) or "" for r in replayed)
    assert origins == sorted(DeadLetterRecord.from_message(m).identity for m in dead)
    assert sorted(json.loads(r.value or b"")["event_id"] for r in replayed) == [
        "f0",
        "f1",
        "f2",
        "f3",
        "f4",
    ]

    # Run 2 (the clock right: the default skew) counts them; an event past the window closes it.
    closer = event("closer", future + WINDOW_MS + 2000)
    produce(settings, topics.USAGE_EVENTS, [(b"skewed", json.dumps(closer).encode())])
    pipeline = PipelineProcess(settings, tmp_path, 1.0, **FAST_WINDOWS)
    pipeline.start()
    stats = TopicReader(settings, topics.USAGE_STATS)
    try:
        stats.read_until(
            lambda ms: any(json.loads(m.value())["user_id"] == "skewed" for m in ms),
            timeout=90,
            check=pipeline.assert_alive,
        )
    finally:
        assert pipeline.stop() == 0
        stats.close()
    with embedded(tmp_path / "clickhouse") as client:
        rows = client.query(
            f"SELECT user_id, service, toUnixTimestamp64Milli(window_start), "
            f"{', '.join(STATS_FIELDS)} FROM keypulse.usage_stats FINAL"
        ).result_rows
        stored_events = client.query(
            "SELECT event_id FROM keypulse.usage_events FINAL ORDER BY event_id"
        ).result_rows
    got = {(r[0], r[1], r[2]): dict(zip(STATS_FIELDS, r[3:], strict=True)) for r in rows}
    assert_windows_equal(got, expected_windows(events, WINDOW_MS))
    assert [r[0] for r in stored_events] == ["closer", "f0", "f1", "f2", "f3", "f4"]

    # A second replay sends nothing: every identity is in the ledger.
    assert summary(keypulse(settings, "dlq", "replay")) == (
        "read 6, distinct 5, replayed 0, skipped 6 (already replayed: 5, duplicate: 1)"
    )
    assert len(replayed_records(settings)) == 5


def test_a_fixed_record_goes_back_from_the_file_inspect_printed(
    dlq_settings: Settings, tmp_path: Path
) -> None:
    settings = dlq_settings
    source = settings.topic(topics.USAGE_EVENTS)
    bad = json.dumps(event("b1", int(time.time() * 1000), status=999)).encode()
    binary = b"\xff\xfe not text"
    producer = Producer(producer_config(settings))
    for value, reason, offset in (
        (bad, "status_code: expected `int` <= 599", 7),
        (binary, "event: invalid UTF-8 at byte 0", 8),
    ):
        headers = dead_letter_headers(DeadLetter(value, b"skewed", reason, 1, offset), source)
        producer.produce(settings.topic(topics.USAGE_EVENTS_DLQ), value, b"skewed", headers=headers)
    assert producer.flush(30) == 0

    refused = keypulse(settings, "dlq", "replay", "--reason", "status_code")
    assert refused.returncode == 1
    assert "not replayable as they are" in refused.stderr
    assert "--from-file" in refused.stderr
    assert summary(keypulse(settings, "dlq", "replay")) == (
        "read 2, distinct 2, replayed 0, skipped 2 (needs a fix (event): 1, "
        "needs a fix (status_code): 1)"
    )

    printed = keypulse(settings, "dlq", "inspect", "--json")
    assert printed.returncode == 0, printed.stderr
    lines = [json.loads(line) for line in printed.stdout.splitlines()]
    assert [(x["reason"].partition(":")[0], x["value_encoding"]) for x in lines] == [
        ("status_code", "text"),
        ("event", "base64"),
    ]
    assert DeadLetterRecord.from_json(lines[1]).value == binary
    fixed = lines[0]
    fixed["value"] = fixed["value"].replace("999", "200")
    path = tmp_path / "fixed.jsonl"
    path.write_text(json.dumps(fixed) + "\n" + json.dumps(lines[1]) + "\n")

    assert summary(keypulse(settings, "dlq", "replay", "--from-file", str(path))) == (
        "read 2, distinct 2, replayed 1, skipped 1 (invalid (event): 1)"
    )
    (replayed,) = replayed_records(settings)
    assert replayed.header(REPLAY_ORIGIN) == f"{source}:1:7"
    assert json.loads(replayed.value or b"")["status_code"] == 200
    assert replayed.key == b"skewed"
    assert summary(keypulse(settings, "dlq", "replay", "--from-file", str(path))) == (
        "read 2, distinct 2, replayed 0, skipped 2 (already replayed: 1, invalid (event): 1)"
    )
    assert len(replayed_records(settings)) == 1

    # A tombstone on the ledger key makes the identity replayable again, deliberately.
    producer.produce(settings.topic(REPLAYED), None, f"{source}:1:7".encode())
    assert producer.flush(30) == 0
    assert summary(keypulse(settings, "dlq", "replay", "--from-file", str(path))) == (
        "read 2, distinct 2, replayed 1, skipped 1 (invalid (event): 1)"
    )
    assert len(replayed_records(settings)) == 2

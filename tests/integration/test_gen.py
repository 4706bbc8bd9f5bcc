"""`keypulse gen` against the real broker: exactly --count events, each keyed by its user_id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from core.kafka import consumer_config
from core.settings import Settings
from core.topics import USAGE_EVENTS
from keypulse import cli
from keypulse.traffic import TrafficGenerator
from schemas.events import InvalidEvent, UsageEvent, decode_event


def _topic_size(consumer: Consumer, topic: str) -> int:
    """Messages in `topic` by its watermarks (retried: leadership may still be settling)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            return sum(
                high - low
                for low, high in (
                    consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    for p in partitions
                )
            )
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_for_messages(settings: Settings, topic: str, at_least: int) -> None:
    """Until `topic` holds `at_least` messages: a condition, not a guess at how long it takes."""
    consumer = Consumer(consumer_config(settings, group_id=f"test-gen-{uuid.uuid4().hex[:8]}"))
    try:
        deadline = time.monotonic() + 60
        while (size := _topic_size(consumer, topic)) < at_least:
            assert time.monotonic() < deadline, f"{topic} holds {size} < {at_least} after 60 s"
            time.sleep(0.05)
    finally:
        consumer.close()


def _server_error_share(events: list[UsageEvent]) -> float:
    assert events  # a share of nothing would hide a missing pair
    return sum(e.status_code >= 500 for e in events) / len(events)


def _consume_all(settings: Settings, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(consumer_config(settings, group_id=f"test-gen-{uuid.uuid4().hex[:8]}"))
    records: list[tuple[bytes, bytes]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(records) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            key, value = msg.key(), msg.value()
            assert isinstance(key, bytes) and isinstance(value, bytes)
            records.append((key, value))
        assert len(records) == expected, f"read {len(records)} of {expected} within 60 s"
        # Nothing beyond the count: the end offsets add up to exactly what we read.
        assert _topic_size(consumer, topic) == expected
    finally:
        consumer.close()
    return records


def test_gen_emits_exactly_count_events_keyed_by_user(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("core.settings.get_settings", lambda: kafka_settings)
    count = 1_500
    code = cli.main(["gen", "--count", str(count), "--rate", "0", "--users", "20",
                     "--seed", "3", "--malformed", "0.05"])
    assert code == 0
    summary = capsys.readouterr().err
    assert f"sent {count:,} events" in summary
    assert "delivery errors 0" in summary

    records = _consume_all(kafka_settings, kafka_settings.topic(USAGE_EVENTS), count)
    assert len(records) == count
    valid = 0
    users = Counter()
    for key, value in records:
        try:
            event = decode_event(value)
        except InvalidEvent:
            continue  # malformed on purpose; its key is still a user id
        else:
            valid += 1
            assert key == event.user_id.encode()
            users[event.user_id] += 1
        finally:
            assert key.startswith(b"usr_")
    assert 0.9 * count < valid < count
    assert len(users) > 10


def test_gen_at_a_rate_for_a_duration(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("core.settings.get_settings", lambda: kafka_settings)
    started = time.monotonic()
    code = cli.main(["gen", "--rate", "400", "--duration", "2", "--seed", "1",
                     "--incident", "error-burst", "--incident-start", "0"])
    elapsed = time.monotonic() - started
    assert code == 0
    err = capsys.readouterr().err
    sent = int(err.split("gen: sent ", 1)[1].split(" ", 1)[0].replace(",", ""))
    # paced by its schedule, never ahead of it (400/s x 2 s = 800); a busy machine lags a little
    assert 600 <= sent <= 800
    assert 2.0 <= elapsed < 15
    records = _consume_all(kafka_settings, kafka_settings.topic(USAGE_EVENTS), sent)
    assert all(k == decode_event(v).user_id.encode() for k, v in records)
    # the error burst (from +0 s) hits the busiest user's main service, and only it
    target = TrafficGenerator(1, 50).default_incident_target()  # --seed 1, --users default 50
    events = [decode_event(v) for _, v in records]
    hit = [e for e in events if (e.user_id, e.service) == target]
    spared = [e for e in events if (e.user_id, e.service) != target]
    assert _server_error_share(hit) > 0.2  # 60% burst statuses, 85% of those 5xx
    assert _server_error_share(spared) < 0.05


def test_gen_refuses_a_missing_topic(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("core.settings.get_settings", lambda: kafka_settings)
    missing = f"{kafka_settings.topic_prefix}no-such-topic-{uuid.uuid4().hex[:6]}"
    code = cli.main(["gen", "--count", "1", "--topic", missing])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_gen_stops_cleanly_on_a_signal_and_delivers_what_it_sent(
    kafka_settings: Settings, signum: signal.Signals
) -> None:
    env = {**os.environ, "KEYPULSE_DEV": "1",
           "KEYPULSE_KAFKA_BOOTSTRAP": kafka_settings.kafka_bootstrap,
           "KEYPULSE_TOPIC_PREFIX": kafka_settings.topic_prefix}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keypulse.cli", "gen", "--rate", "500", "--seed", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the start line: the producer is up
        assert "gen: 50 users" in first, first
        _wait_for_messages(kafka_settings, kafka_settings.topic(USAGE_EVENTS), 200)
        assert proc.poll() is None  # still sending when the signal comes
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = err.strip().splitlines()[-1]
    assert "delivery errors 0" in summary
    sent = int(summary.split("gen: sent ", 1)[1].split(" ", 1)[0].replace(",", ""))
    assert sent >= 200
    records = _consume_all(kafka_settings, kafka_settings.topic(USAGE_EVENTS), sent)
    assert len(records) == sent

"""A hostile producer against `keypulse run`, through the real broker (issue: hostile input).

The poison mix any signed-in user could send — events on 101 distinct days, events dated
2099, a message of almost 1 MB, a tombstone, 2,049 events whose token sum overflows UInt64,
more services than a user may have — followed by ordinary traffic of other users on the same
partitions. The process must stay up and healthy, and everyone else's figures must come out
exact: nothing late, nothing missing, nothing extra.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from core import topics
from core.kafka import producer_config
from core.settings import Settings
from tests.integration.harness import RunProcess, TopicReader, embedded, produce
from tests.integration.truth import STATS_FIELDS, assert_windows_equal, expected_windows

pytestmark = pytest.mark.integration

WINDOW_MS = 2000
DAY_MS = 86_400_000
UINT64_MAX = 2**64 - 1
MAX_SERVICES = 20
ENV = {
    "KEYPULSE_WINDOW_SECONDS": "2",
    "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1",
    "KEYPULSE_EVENTS_TTL_DAYS": "365",  # the 101 days are admitted: storage must cope
    "KEYPULSE_MAX_SERVICES_PER_USER": str(MAX_SERVICES),
}


def event(event_id: str, user_id: str, ts: int, service: str = "openai", **extra: Any
          ) -> dict[str, Any]:
    return {"event_id": event_id, "ts": ts, "user_id": user_id, "api_key_id": "k1",
            "service": service, "status_code": 200, "latency_ms": 12.5, **extra}


def encode(e: dict[str, Any]) -> tuple[bytes, bytes]:
    return e["user_id"].encode(), json.dumps(e).encode()


def poison(now_ms: int) -> tuple[list[tuple[bytes, bytes]], int, int]:
    """(messages, events dated in the future, events beyond the service cap)."""
    messages = [encode(event(f"day-{d}", "evil-days", now_ms - d * DAY_MS))
                for d in range(1, 102)]
    future = [encode(event(f"future-{u}", f"evil-future-{u}", 4_070_908_800_000))  # 2099
              for u in range(16)]
    tokens_ts = now_ms - 30_000
    tokens = [encode(event(f"tok-{i}", "evil-tokens", tokens_ts, tokens_in=2**53))
              for i in range(2049)]
    services = [encode(event(f"svc-{i}", "evil-services", now_ms - 25_000, service=f"svc{i}"))
                for i in range(MAX_SERVICES + 10)]
    return messages + future + tokens + services, len(future), 10


def test_poison_mix_then_ordinary_traffic_is_exact_and_the_process_stays_healthy(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    run = RunProcess(kafka_settings, tmp_path, **ENV)
    run.start()
    try:
        run.wait_healthy()
        now_ms = int(time.time() * 1000)
        messages, future_count, over_cap = poison(now_ms)
        produce(kafka_settings, topics.USAGE_EVENTS, messages)
        # A value of almost 1 MB (a default producer accepts it) and a tombstone.
        big = b"x" * 999_950
        producer = Producer(producer_config(kafka_settings))
        topic = kafka_settings.topic(topics.USAGE_EVENTS)
        producer.produce(topic, big, b"evil-big")
        producer.produce(topic, None, b"evil-tombstone")
        assert producer.flush(30) == 0

        # Then ordinary users, on the same partitions, in the recent past.
        rng = random.Random(3)
        start = (int(time.time() * 1000) // WINDOW_MS) * WINDOW_MS - 20_000
        ordinary = [
            event(f"ok-{i}", f"user-{i % 8}", start + i * 40, ("openai", "stripe")[i % 2],
                  status_code=rng.choice([200, 201, 302, 399, 400, 404, 500, 503]),
                  latency_ms=round(rng.lognormvariate(4, 0.8), 3),
                  tokens_in=rng.randint(0, 500))
            for i in range(500)
        ]
        produce(kafka_settings, topics.USAGE_EVENTS, [encode(e) for e in ordinary])
        expected = expected_windows(ordinary, WINDOW_MS)

        stats = TopicReader(kafka_settings, topics.USAGE_STATS)
        dlq = TopicReader(kafka_settings, topics.USAGE_EVENTS_DLQ)
        try:
            def ordinary_windows(ms: list[Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
                out = {}
                for m in ms:
                    s = json.loads(m.value())
                    if s["user_id"].startswith("user-"):
                        start_ms = round(datetime.fromisoformat(s["window_start"]).timestamp()
                                         * 1000)
                        out[(s["user_id"], s["service"], start_ms)] = s
                return out

            stats.read_until(lambda ms: len(ordinary_windows(ms)) >= len(expected),
                             timeout=120, check=run.assert_alive)
            dead = dlq.read_until(
                lambda ms: len(ms) >= future_count + over_cap + 2, timeout=60,
                check=run.assert_alive)
            published = ordinary_windows(stats.messages)
            tokens_windows = [json.loads(m.value()) for m in stats.messages
                              if json.loads(m.value())["user_id"] == "evil-tokens"]
        finally:
            stats.close()
            dlq.close()

        # Still up, and healthy.
        run.assert_alive()
        status, body = run.get("/healthz")
        assert status == 200, body
    finally:
        code = run.stop(timeout=60)
    assert code == 0, run.log.read_text()[-4000:]

    assert_windows_equal({k: {f: v[f] for f in STATS_FIELDS} for k, v in published.items()},
                         expected)
    assert [w["tokens_in"] for w in tokens_windows] == [UINT64_MAX]  # saturated, not wrapped

    by_prefix: dict[str, list[Any]] = {}  # reason name (before its detail) → records
    for m in dead:
        headers = dict(m.headers() or [])
        name = headers["keypulse.reason"].decode().split(":")[0]
        by_prefix.setdefault(name, []).append((m, headers))
    assert len(by_prefix["ts_in_future"]) == future_count, by_prefix.keys()
    assert len(by_prefix["too_many_services"]) == over_cap, by_prefix.keys()
    (tombstone, _), = by_prefix["tombstone"]
    assert tombstone.value() is None and tombstone.key() == b"evil-tombstone"
    (truncated, headers), = [(m, h) for ms in by_prefix.values() for m, h in ms
                             if m.key() == b"evil-big"]
    assert int(headers["keypulse.original.size"]) == len(big)
    assert headers["keypulse.original.sha256"].decode() == hashlib.sha256(big).hexdigest()
    assert len(truncated.value()) < len(big)

    with embedded(tmp_path / "clickhouse") as client:
        late = client.query(
            "SELECT count() FROM keypulse.usage_events FINAL "
            "WHERE startsWith(user_id, 'user-') AND late").result_rows[0][0]
        rows = client.query(
            "SELECT count() FROM keypulse.usage_events FINAL "
            "WHERE startsWith(user_id, 'user-')").result_rows[0][0]
        days = client.query(
            "SELECT count() FROM keypulse.usage_events FINAL "
            "WHERE user_id = 'evil-days'").result_rows[0][0]
        stored_tokens = client.query(
            "SELECT tokens_in FROM keypulse.usage_stats FINAL "
            "WHERE user_id = 'evil-tokens'").result_rows
    assert (rows, late) == (len(ordinary), 0)
    assert days == 101  # 101 days in one insert: stored, the dataflow went on
    assert stored_tokens == [(UINT64_MAX,)]

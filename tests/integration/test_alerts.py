"""Alerts end to end on the real broker and embedded ClickHouse."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from core import topics
from core.settings import Settings
from schemas.alerts import AlertRule, Metric, Op
from tests.integration.harness import PipelineProcess, TopicReader, embedded, produce

pytestmark = pytest.mark.integration

W = 2000
ENV = {"KEYPULSE_WINDOW_SECONDS": "2", "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1"}


def window(
    user: str, start: int, errors_per_100: int, n: int = 100, service: str = "openai"
) -> list[tuple[bytes, bytes]]:
    return [
        (
            user.encode(),
            json.dumps(
                {
                    "event_id": f"{user}-{service}-{start}-{i}",
                    "ts": start + i * 10,
                    "user_id": user,
                    "api_key_id": "k",
                    "service": service,
                    "status_code": 503 if i < errors_per_100 * n // 100 else 200,
                    "latency_ms": 30.0,
                }
            ).encode(),
        )
        for i in range(n)
    ]


def alerts_seen(messages: list[Any], service: str | None = None) -> list[tuple[str, str, str]]:
    out = []
    for m in messages:
        a = json.loads(m.value())
        if service is None or a["service"] == service:
            out.append((a["rule_id"], a["state"], a["alert_id"]))
    return out


def aligned_now(lag_ms: int) -> int:
    """A window start `lag_ms` behind the wall clock. The watermark of a caught-up partition
    moves with the wall clock, so events placed at a constant lag behind it stay on time
    however long the test has been running."""
    return (int(time.time() * 1000) - lag_ms) // W * W


def test_incidents_fire_once_resolve_once_and_rules_apply_live(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    t0 = (int(time.time() * 1000) // W) * W - 300_000
    # phase 1: alice has 20 % errors in windows 3..5; bob 3 % in windows 3..5 (under 5 %)
    phase1 = []
    for w in range(10):
        phase1 += window("alice", t0 + w * W, 20 if 3 <= w <= 5 else 0)
        phase1 += window("bob", t0 + w * W, 3 if 3 <= w <= 5 else 0)
    produce(kafka_settings, topics.USAGE_EVENTS, phase1)

    pipeline = PipelineProcess(kafka_settings, tmp_path, **ENV)
    pipeline.start()
    reader = TopicReader(kafka_settings, topics.USAGE_ALERTS)
    try:
        seen = reader.read_until(lambda ms: len(ms) >= 2, timeout=90, check=pipeline.assert_alive)
        first = alerts_seen(seen)
        assert [(r, s) for r, s, _ in first] == [
            ("default:alice:error_rate", "firing"),
            ("default:alice:error_rate", "resolved"),
        ]
        assert first[0][2] == first[1][2]

        # phase 2: a stricter rule for bob, posted mid-stream, applies from the next window
        rule = AlertRule(
            rule_id="bob-strict",
            user_id="bob",
            name="strict errors",
            metric=Metric.ERROR_RATE,
            op=Op.GT,
            threshold=0.01,
            for_windows=1,
            version=1,
        )
        produce(kafka_settings, topics.ALERT_RULES, [(b"bob-strict", msgspec.json.encode(rule))])
        # No fixed sleep: wait for the rule's effect. bob-strict has no service filter, so it
        # also covers bob's "probe" service: one 3 % window there at a time until it fires
        # (bounded); from then on the rule is in force for bob's next openai windows too.
        probe_start, probed_at = 0, 0.0

        def send_probe() -> None:  # called between polls: a new probe window every 3 s
            nonlocal probe_start, probed_at
            pipeline.assert_alive()
            if time.monotonic() - probed_at >= 3:
                probe_start = max(probe_start + W, aligned_now(lag_ms=275_000))
                produce(kafka_settings, topics.USAGE_EVENTS,
                        window("bob", probe_start, 3, service="probe"))
                probed_at = time.monotonic()

        reader.read_until(lambda ms: bool(alerts_seen(ms, "probe")), timeout=60, check=send_probe)
        assert alerts_seen(reader.messages, "probe")[0][:2] == ("bob-strict", "firing")
        # after the last probe window, and ahead of the watermark
        t2 = max(aligned_now(lag_ms=265_000), probe_start + W)
        phase2 = []
        for w in range(6):
            phase2 += window("alice", t2 + w * W, 0)
            phase2 += window("bob", t2 + w * W, 3 if 1 <= w <= 2 else 0)
        produce(kafka_settings, topics.USAGE_EVENTS, phase2)
        seen = reader.read_until(
            lambda ms: len(alerts_seen(ms, "openai")) >= 4
            and len(alerts_seen(ms, "probe")) >= 2,  # the probe's episode resolves (idle)
            timeout=90,
            check=pipeline.assert_alive,
        )
        second = alerts_seen(seen, "openai")[2:]
        assert [(r, s) for r, s, _ in second] == [
            ("bob-strict", "firing"),
            ("bob-strict", "resolved"),
        ]
        probed = alerts_seen(seen, "probe")
        assert [(r, s) for r, s, _ in probed] == [
            ("bob-strict", "firing"),
            ("bob-strict", "resolved"),
        ]

    finally:
        assert pipeline.stop() == 0
        reader.close()

    with embedded(tmp_path / "clickhouse") as client:
        rows = client.query(
            "SELECT rule_id, state, alert_id, user_id FROM keypulse.alerts FINAL "
            "ORDER BY fired_at, state"
        ).result_rows
        notes = client.query(
            "SELECT notification_id, template FROM keypulse.notifications "
            "FINAL ORDER BY notification_id"
        ).result_rows
        rules = client.query(
            "SELECT rule_id, threshold, is_deleted FROM keypulse.alert_rules FINAL"
        ).result_rows
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(first + second + probed)
    assert {r[3] for r in rows} == {"alice", "bob"}
    assert len(notes) == 6
    assert {n[0] for n in notes} == {f"alert:{a}:{s}" for _, s, a in first + second + probed}
    assert rules == [("bob-strict", 0.01, 0)]


def test_a_full_replay_after_kill_9_re_emits_the_same_alerts_and_adds_no_episode(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    t0 = (int(time.time() * 1000) // W) * W - 300_000
    stream = []
    for w in range(10):
        for user in ("alice", "carol"):
            stream += window(user, t0 + w * W, 20 if 2 <= w <= 4 else 0)
    produce(kafka_settings, topics.USAGE_EVENTS, stream)
    # No snapshot within the test: the restart replays the topic from the start.
    pipeline = PipelineProcess(kafka_settings, tmp_path, epoch_seconds=3600, **ENV)
    pipeline.start()
    reader = TopicReader(kafka_settings, topics.USAGE_ALERTS)
    try:
        first = alerts_seen(
            reader.read_until(lambda ms: len(ms) >= 4, timeout=90, check=pipeline.assert_alive)
        )
        pipeline.kill9()
        pipeline.start()
        again = alerts_seen(
            reader.read_until(lambda ms: len(ms) >= 8, timeout=90, check=pipeline.assert_alive)
        )[4:]
    finally:
        assert pipeline.stop() == 0
        reader.close()
    assert sorted(again) == sorted(first)  # the same records, the same ids
    assert {(r, s) for r, s, _ in first} == {
        ("default:alice:error_rate", "firing"),
        ("default:alice:error_rate", "resolved"),
        ("default:carol:error_rate", "firing"),
        ("default:carol:error_rate", "resolved"),
    }
    # Every column the dataflow writes (`emitted_at` is stamped by the server on insert)
    columns = (
        "alert_id, state, rule_id, user_id, service, value, window_start, window_end, "
        "fired_at, resolved_at, message"
    )
    with embedded(tmp_path / "clickhouse") as client:
        final = client.query(f"SELECT {columns} FROM keypulse.alerts FINAL").result_rows
        # Without FINAL: the original rows and, unless a background merge already replaced
        # them, the replay's twins (how many survive is up to the merges, so not counted).
        stored = client.query(f"SELECT {columns} FROM keypulse.alerts").result_rows
    assert sorted((r[0], r[1]) for r in final) == sorted((a, s) for _, s, a in first)
    # Exact: the replay's twins are the same records, column for column, so FINAL (which
    # keeps one of each) hides no difference between a run and its replay.
    assert set(stored) == set(final)
    assert len(set(final)) == len(final) == 4

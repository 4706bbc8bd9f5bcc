"""Alerts through the whole in-memory dataflow: default rules, rules from alert.rules,
provider incidents, and replay determinism."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from bytewax.testing import TestingSink, TestingSource, run_main

from pipeline.alerting.hook import AlertingHook
from pipeline.flow import build_flow
from pipeline.items import PartitionOutput, SourceBatch
from pipeline.processor import ProcessorConfig
from schemas.alerts import AlertRule, Metric, Op

T = 1_700_000_000_000
WALL = T + 300_000  # the source's clock: every event below is in its past (admitted)
CONFIG = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=0)


def window_events(
    user: str, start: int, n: int, errors: int, service: str = "openai", prefix: str = ""
) -> list[bytes]:
    return [
        json.dumps(
            {
                "event_id": f"{prefix}{user}-{start}-{i}",
                "ts": start + i * 10,
                "user_id": user,
                "api_key_id": "k",
                "service": service,
                "status_code": 500 if i < errors else 200,
                "latency_ms": 20.0,
            }
        ).encode()
        for i in range(n)
    ]


def run(
    records: list[bytes], rules: list[tuple[bytes, bytes | None]] | None = None
) -> list[PartitionOutput]:
    out: list[tuple[str, PartitionOutput]] = []
    events = TestingSource(
        [SourceBatch(0, [(i, None, r) for i, r in enumerate(records)], WALL, False)]
    )
    rule_source = None
    if rules is not None:
        rule_source = TestingSource(
            [SourceBatch(0, [(i, k, v) for i, (k, v) in enumerate(rules)], WALL, False)]
        )
    run_main(
        build_flow(
            events,
            TestingSink(out),
            CONFIG,
            partitions=[0],
            rules=rule_source,
            hook_factory=AlertingHook,
        )
    )
    return [o for _, o in out]


def alerts_of(outputs: list[PartitionOutput]) -> list[tuple[str, str, str, int]]:
    return [
        (a.rule_id, a.state.value, a.alert_id, int(a.window_end.timestamp() * 1000))
        for o in outputs
        for a in o.alerts
    ]


def error_burst(*users: str) -> list[bytes]:
    # windows 0..7: clean, clean, 20% errors x3, clean x3; then one far event closes them
    plan = [0, 0, 10, 10, 10, 0, 0, 0]
    records: list[bytes] = []
    for w, errors in enumerate(plan):
        for user in users or ("alice",):
            records += window_events(user, T + w * 10_000, 50, errors)
    return records


def test_error_burst_fires_once_and_resolves_once_with_one_id() -> None:
    records = error_burst() + window_events("alice", T + 200_000, 1, 0)
    alerts = [a for a in alerts_of(run(records)) if a[0] == "default:alice:error_rate"]
    assert [a[1] for a in alerts] == ["firing", "resolved"]
    assert alerts[0][2] == alerts[1][2]  # one episode, one alert_id
    assert alerts[0][3] == T + 40_000  # for_windows 2: fires at the end of the 2nd breach
    assert alerts[1][3] == T + 60_000  # resolve_windows 1: first clean window


def test_notifications_follow_alerts_with_derived_ids() -> None:
    outputs = run(error_burst() + window_events("alice", T + 200_000, 1, 0))
    notes = [n for o in outputs for n in o.notifications]
    ids = [a[2] for a in alerts_of(outputs)]
    assert {n.notification_id for n in notes} == {
        f"alert:{i}:{s}" for i, s in zip(ids, ["firing", "resolved"], strict=True)
    }
    assert {n.template for n in notes} == {"alert_firing", "alert_resolved"}
    firing = next(n for n in notes if n.template == "alert_firing")
    assert firing.message.startswith("openai error rate 20% > 5% for 2 consecutive 10 s windows")


def test_a_rule_from_alert_rules_replaces_the_default() -> None:
    rule = AlertRule(
        rule_id="default:alice:error_rate",
        user_id="alice",
        name="lenient",
        metric=Metric.ERROR_RATE,
        op=Op.GT,
        threshold=0.5,
        version=1,
    )
    outputs = run(
        error_burst() + window_events("alice", T + 200_000, 1, 0),
        rules=[(b"default:alice:error_rate", msgspec.json.encode(rule))],
    )
    assert [a for a in alerts_of(outputs) if a[0] == "default:alice:error_rate"] == []
    rows = [r for o in outputs for r in o.rule_rows]
    assert [(r[0], r[1], r[5], r[13]) for r in rows] == [
        ("default:alice:error_rate", "alice", 0.5, 0)
    ]


def incidents_in(outputs: list[PartitionOutput]) -> list[Any]:
    return [n for o in outputs for n in o.notifications if n.template == "provider_incident"]


def test_fresh_accounts_cannot_raise_a_provider_incident() -> None:
    records = error_burst("u1", "u2", "u3", "u4")
    records += window_events("u1", T + 200_000, 1, 0)
    outputs = run(records)
    assert {a[0] for a in alerts_of(outputs)} >= {f"default:u{i}:error_rate" for i in range(1, 5)}
    assert incidents_in(outputs) == []  # all four fire, none has traffic history


def test_provider_incident_is_one_system_notification() -> None:
    # ten users with 30 clean windows of history (IncidentConfig's defaults), then four of
    # them see 20 % of 5xx for three windows
    records: list[bytes] = []
    for w in range(38):
        for i in range(10):
            errors = 4 if 32 <= w <= 34 and 1 <= i <= 4 else 0
            records += window_events(f"u{i}", T + w * 10_000, 20, errors)
    records += window_events("u1", T + 600_000, 1, 0)
    outputs = run(records)
    incidents = incidents_in(outputs)
    assert len(incidents) == 1
    assert incidents[0].user_id == "*"
    assert incidents[0].message.startswith("openai: 3 users see 5xx rates")


def test_same_input_same_alerts() -> None:
    records = error_burst() + window_events("alice", T + 200_000, 1, 0)
    first: list[Any] = [o.alerts for o in run(records)]
    second: list[Any] = [o.alerts for o in run(records)]
    assert first == second


def test_alerts_follow_their_stats_and_survive_a_snapshot_in_between() -> None:
    from pipeline.processor import PartitionProcessor

    records = error_burst() + window_events("alice", T + 200_000, 1, 0)
    processor = PartitionProcessor(CONFIG, None, AlertingHook)
    batch = SourceBatch(0, [(i, None, r) for i, r in enumerate(records)], WALL, False)
    [closing], _ = processor.on_batch([batch])
    assert len(closing.stats) == 8 and closing.alerts == []  # the stats leave first
    # A snapshot taken before the next batch carries the windows still to evaluate.
    resumed = PartitionProcessor(CONFIG, processor.snapshot(), AlertingHook)
    [after], _ = resumed.on_eof()
    [direct], _ = processor.on_batch([])
    assert alerts_of([after]) == alerts_of([direct])
    assert [a[1] for a in alerts_of([after]) if a[0] == "default:alice:error_rate"] == [
        "firing", "resolved"]

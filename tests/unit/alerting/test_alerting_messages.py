"""Message wording and alert → notification mapping."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from core import templates
from core.errors import ConfigError
from core.settings import load
from pipeline.alerting import AlertEvaluator, incident_notification, notification_for
from pipeline.alerting.messages import format_value
from pipeline.alerting.testing import make_stats
from pipeline.runner import kafka_flow
from schemas.alerts import Alert, AlertRule, AlertState, Metric, Op, Severity
from schemas.notifications import NotificationType

START = int(datetime(2024, 5, 1, 14, 3, 10, tzinfo=UTC).timestamp() * 1000)


def rule(**kw: object) -> AlertRule:
    fields: dict[str, object] = {
        "rule_id": "r", "user_id": "u1", "name": "Errors", "metric": Metric.ERROR_RATE,
        "op": Op.GT, "threshold": 0.05,
    }
    fields.update(kw)
    return AlertRule(**fields)  # type: ignore[arg-type]


def test_error_rate_firing_and_resolved_messages() -> None:
    ev = AlertEvaluator()
    r = rule()
    (fired,) = ev.on_window(make_stats(requests=250, server_errors=31, start_ms=START), [r])
    assert fired.message == (
        "openai error rate 12.4% > 5% over the 10 s window ending 14:03:20 UTC (250 requests)"
    )
    (done,) = ev.on_window(
        make_stats(window=4, requests=250, server_errors=3, start_ms=START), [r]
    )
    assert done.message == (
        "openai error rate back to 1.2% (≤ 5%) over the 10 s window ending 14:04:00 UTC "
        "(250 requests)"
    )


def test_multi_window_latency_message() -> None:
    ev = AlertEvaluator()
    r = rule(metric=Metric.LATENCY_P95_MS, threshold=2000.0, for_windows=2)
    ev.on_window(make_stats(requests=250, latency_ms=2340.0, start_ms=START), [r])
    (fired,) = ev.on_window(
        make_stats(window=1, requests=250, latency_ms=2340.0, start_ms=START), [r]
    )
    assert fired.message == (
        "openai p95 latency 2,340 ms > 2,000 ms for 2 consecutive 10 s windows, "
        "the last ending 14:03:30 UTC (250 requests)"
    )


@pytest.mark.parametrize(
    ("metric", "value", "text"),
    [
        (Metric.ERROR_RATE, 0.125, "12.5%"),
        (Metric.SUCCESS_RATE, 0.07, "7%"),
        (Metric.SERVER_ERROR_RATE, 0.0004, "0.04%"),
        (Metric.LATENCY_P99_MS, 12.34, "12.3 ms"),
        (Metric.LATENCY_AVG_MS, 1234.5, "1,234 ms"),
        (Metric.COST_USD, 1.5, "$1.50"),
        (Metric.COST_USD, 0.0012, "$0.0012"),
        (Metric.TOKENS, 120_000.0, "120,000"),
        (Metric.REQUESTS, 42.0, "42"),
        (Metric.REQUESTS_ANOMALY, 4.0, "z 4"),
    ],
)
def test_format_value(metric: Metric, value: float, text: str) -> None:
    assert format_value(metric, value) == text


def alert(state: AlertState, severity: Severity) -> Alert:
    at = datetime(2024, 5, 1, 14, 3, 20, tzinfo=UTC)
    return Alert(
        alert_id="abc", rule_id="r", rule_name="Errors", user_id="u1", service="openai",
        metric=Metric.ERROR_RATE, op=Op.GT, threshold=0.05, value=0.1, severity=severity,
        state=state, window_start=at, window_end=at, fired_at=at,
        resolved_at=at if state == AlertState.RESOLVED else None, message="m",
    )


@pytest.mark.parametrize(
    ("state", "severity", "kind", "template"),
    [
        (AlertState.FIRING, Severity.CRITICAL, NotificationType.ERROR, "alert_firing"),
        (AlertState.FIRING, Severity.WARNING, NotificationType.WARNING, "alert_firing"),
        (AlertState.FIRING, Severity.INFO, NotificationType.INFO, "alert_firing"),
        (AlertState.RESOLVED, Severity.CRITICAL, NotificationType.SUCCESS, "alert_resolved"),
    ],
)
def test_notification_for(state: AlertState, severity: Severity, kind: NotificationType,
                          template: str) -> None:
    note = notification_for(alert(state, severity))
    assert note.type == kind
    assert note.template == template
    assert note.notification_id == f"alert:abc:{state}"
    assert note.user_id == "u1"
    assert note.message == "m"
    assert note == notification_for(alert(state, severity))  # deterministic


@pytest.mark.parametrize("metric", [Metric.REQUESTS, Metric.COST_USD, Metric.TOKENS])
def test_a_usage_rule_firing_is_a_usage_threshold_notification(metric: Metric) -> None:
    usage = msgspec.structs.replace(alert(AlertState.FIRING, Severity.WARNING), metric=metric,
                                    threshold=1000.0, value=1500.0, rule_name="Budget")
    note = notification_for(usage)
    assert note.template == "usage_threshold"
    assert note.notification_id == "alert:abc:firing"  # ids do not depend on the wording
    assert note.type == NotificationType.WARNING
    assert note.title == "openai: usage threshold reached (Budget)"
    assert note.message == f"{metric} reached 1500 in one window (your threshold: > 1000)."
    assert note.data["value"] == "1500"
    assert note.data["threshold"] == "1000"
    resolved = notification_for(msgspec.structs.replace(usage, state=AlertState.RESOLVED,
                                                        resolved_at=usage.fired_at))
    assert resolved.template == "alert_resolved"


def test_notifications_are_worded_by_the_registry_given(tmp_path: Path) -> None:
    raw = json.loads((Path(templates.__file__).parent.parent / "schemas"
                      / "notification_templates.json").read_text())
    raw["alert_firing"]["title"] = "ALERT {rule_name} on {service}"
    raw["provider_incident"]["body"] = "{users} users, {service}"
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(raw))
    registry = templates.load(path)
    note = notification_for(alert(AlertState.FIRING, Severity.CRITICAL), registry)
    assert note.title == "ALERT Errors on openai"
    assert note.data["alert_id"] == "abc"
    incident = incident_notification("openai", 0, 10_000, 4, registry)
    assert incident.message == "4 users, openai"
    assert incident.notification_id == "provider_incident:openai:0"


def test_the_pipeline_does_not_start_with_invalid_templates(tmp_path: Path) -> None:
    path = tmp_path / "templates.json"
    path.write_text('{"alert_firing": {"type": "info", "title": "{nope}", "body": "",'
                    ' "fields": []}}')
    settings = load(dev=True, data_dir=tmp_path, notification_templates_file=path)
    with pytest.raises(ConfigError, match="notification templates"):
        kafka_flow(settings)  # before it asks Kafka anything

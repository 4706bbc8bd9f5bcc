"""An alert state change as a user notification, worded by the template registry
(core/templates.py): `alert_firing`, or `usage_threshold` when a usage rule (requests, cost,
tokens) fires, and `alert_resolved`.

The notification id is `alert:{alert_id}:{state}`: derived from the alert id, so a replay
produces the same id and the idempotent sinks keep one copy.
"""

from __future__ import annotations

import functools

from core import templates as registry
from core.templates import Templates
from schemas.alerts import Alert, AlertState, Metric
from schemas.notifications import Notification

USAGE_METRICS = frozenset({Metric.REQUESTS, Metric.COST_USD, Metric.TOKENS})
"""A rule on these says how much was used, not that something is broken."""


def notification_id(alert_id: str, state: str) -> str:
    return f"alert:{alert_id}:{state}"


@functools.cache
def default_templates() -> Templates:
    """The packaged registry, for callers not given one (tests, tools)."""
    return registry.load()


def template_for(alert: Alert) -> str:
    if alert.state != AlertState.FIRING:
        return "alert_resolved"
    return "usage_threshold" if alert.metric in USAGE_METRICS else "alert_firing"


def notification_for(alert: Alert, templates: Templates | None = None) -> Notification:
    """The notification for one alert record (firing or resolved); its `data` is the
    template's fields."""
    firing = alert.state == AlertState.FIRING
    created_at = alert.fired_at if firing else alert.resolved_at or alert.window_end
    return (templates or default_templates()).notification(
        template_for(alert),
        notification_id=notification_id(alert.alert_id, alert.state),
        user_id=alert.user_id,
        created_at=created_at,
        fields={
            "alert_id": alert.alert_id,
            "rule_id": alert.rule_id,
            "rule_name": alert.rule_name,
            "service": alert.service,
            "metric": str(alert.metric),
            "op": str(alert.op),
            "threshold": number(alert.threshold),
            "value": number(alert.value),
            "severity": str(alert.severity),
            "state": str(alert.state),
            "message": alert.message,
        },
    )


def number(value: float) -> str:
    """A figure for data and text: exact (repr), without a trailing `.0` when whole."""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)

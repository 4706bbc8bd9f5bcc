"""An alert state change as a user notification (templates `alert_firing` / `alert_resolved`).

The notification id is `alert:{alert_id}:{state}`: derived from the alert id, so a replay
produces the same id and the idempotent sinks keep one copy.
"""

from __future__ import annotations

from schemas.alerts import Alert, AlertState, Severity
from schemas.notifications import Notification, NotificationType

FIRING_TYPES: dict[str, NotificationType] = {
    Severity.CRITICAL: NotificationType.ERROR,
    Severity.WARNING: NotificationType.WARNING,
    Severity.INFO: NotificationType.INFO,
}


def notification_id(alert_id: str, state: str) -> str:
    return f"alert:{alert_id}:{state}"


def notification_for(alert: Alert) -> Notification:
    """The notification for one alert record (firing or resolved)."""
    firing = alert.state == AlertState.FIRING
    if firing:
        kind = FIRING_TYPES[alert.severity]
        title = f"{alert.service}: {alert.rule_name}"
        created_at = alert.fired_at
    else:
        kind = NotificationType.SUCCESS
        title = f"Resolved: {alert.service}: {alert.rule_name}"
        created_at = alert.resolved_at or alert.window_end
    return Notification(
        notification_id=notification_id(alert.alert_id, alert.state),
        user_id=alert.user_id,
        type=kind,
        template="alert_firing" if firing else "alert_resolved",
        title=title[:256],
        message=alert.message[:4096],
        created_at=created_at,
        data={
            "alert_id": alert.alert_id,
            "rule_id": alert.rule_id,
            "service": alert.service,
            "metric": str(alert.metric),
            "severity": str(alert.severity),
            "state": str(alert.state),
            "value": repr(alert.value),
            "threshold": repr(alert.threshold),
        },
    )

"""Pure mappings from messages to ClickHouse rows (snuba's `process_message` shape)."""

from __future__ import annotations

from enum import Enum
from typing import Any

import msgspec

from schemas.alerts import Alert, AlertRule
from schemas.events import UsageEvent
from schemas.notifications import Notification

_encode = msgspec.json.Encoder().encode


def event_json(
    event: UsageEvent, ts_ms: int, late: bool, partition: int, offset: int, ingested_ms: int
) -> bytes:
    """One line for `usage_events_ingest` (JSONEachRow): the event re-encoded with its known
    fields only, plus `__kp` = [ts_ms, late, partition, offset, ingested_ms]."""
    return b'%b,"__kp":[%d,%d,%d,%d,%d]}' % (
        _encode(event)[:-1],
        ts_ms,
        late,
        partition,
        offset,
        ingested_ms,
    )


ALERT_COLUMNS = (
    "alert_id",
    "rule_id",
    "rule_name",
    "user_id",
    "service",
    "metric",
    "op",
    "threshold",
    "value",
    "severity",
    "state",
    "window_start",
    "window_end",
    "fired_at",
    "resolved_at",
    "message",
    "emitted_at",
)
NOTIFICATION_COLUMNS = (
    "notification_id",
    "user_id",
    "type",
    "template",
    "title",
    "message",
    "data",
    "created_at",
)


def alert_row(alert: Alert, emitted_ms: int) -> tuple[Any, ...]:
    values = (getattr(alert, name) for name in ALERT_COLUMNS[:-1])
    return (*(v.value if isinstance(v, Enum) else v for v in values), emitted_ms)


def notification_row(note: Notification) -> tuple[Any, ...]:
    return (
        note.notification_id,
        note.user_id,
        str(note.type),
        note.template,
        note.title,
        note.message,
        dict(note.data),
        note.created_at,
    )


RULE_COLUMNS = (
    "rule_id",
    "user_id",
    "name",
    "metric",
    "op",
    "threshold",
    "service",
    "for_windows",
    "resolve_windows",
    "min_requests",
    "severity",
    "enabled",
    "version",
    "is_deleted",
    "updated_at",
)


def rule_row(rule: AlertRule, deleted: bool, updated_ms: int) -> tuple[Any, ...]:
    """An `alert_rules` row; a delete repeats the rule's last version with is_deleted = 1."""
    return (
        rule.rule_id,
        rule.user_id,
        rule.name,
        rule.metric.value,
        rule.op.value,
        rule.threshold,
        rule.service,
        rule.for_windows,
        rule.resolve_windows,
        rule.min_requests,
        rule.severity.value,
        rule.enabled,
        rule.version,
        int(deleted),
        updated_ms,
    )

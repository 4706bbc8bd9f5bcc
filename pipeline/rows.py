"""Pure mappings from messages to ClickHouse rows (snuba's `process_message` shape)."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.alerts import AlertRule
from schemas.events import UsageEvent

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

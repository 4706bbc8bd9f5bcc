"""Pure mappings from messages to ClickHouse rows (snuba's `process_message` shape)."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.alerts import AlertRule
from schemas.events import UsageEvent

_encode = msgspec.json.Encoder().encode

# A `usage_events_rows` row: the validated event's fields in declaration order
# (msgspec.structs.astuple) followed by these. The processor builds it inline, as
# `astuple(event) + (ts_ms, late, partition, offset, ingested_ms)`, once per event.
EVENT_ROW_COLUMNS = (
    *(field.name for field in msgspec.structs.fields(UsageEvent)),
    "ts_ms",
    "late",
    "kafka_partition",
    "kafka_offset",
    "ingested_ms",
)


def encode_rows(rows: list[tuple[Any, ...]]) -> bytes:
    """JSONCompactEachRow text for `usage_events_rows`, in one encoder call for the batch.

    The batch encodes as one JSON array; without its brackets it is rows separated by
    commas, which the format accepts. Canonical JSON from validated fields: ClickHouse reads
    exactly the values the windows counted.
    """
    return _encode(rows)[1:-1]


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

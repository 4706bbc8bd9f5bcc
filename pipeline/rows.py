"""Pure mappings from messages to ClickHouse rows (snuba's `process_message` shape)."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.alerts import AlertRule

_encode = msgspec.json.Encoder().encode

# A `usage_events_rows` row. The event is a msgspec struct, encoded as a JSON object that
# ClickHouse reads into the named tuple `event`: building this 6-tuple is the only per-event
# work the row costs the dataflow's thread besides one encoder call per poll batch.
EVENT_ROW_COLUMNS = ("ts_ms", "late", "kafka_partition", "kafka_offset", "ingested_ms", "event")


def encode_rows(rows: list[tuple[Any, ...]]) -> bytes:
    """JSONCompactEachRow text for `usage_events_rows`, in one encoder call for the batch.

    The batch encodes as one JSON array; without its brackets it is rows separated by
    commas, which the format accepts. Events are re-encoded from their validated fields
    (unique, plain keys; unknown fields dropped): ClickHouse reads exactly what the windows
    counted, whatever form the SDK sent.
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

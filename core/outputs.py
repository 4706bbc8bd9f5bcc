"""Every output of the dataflow, declared once: Kafka topic, ClickHouse table, columns, model.

snuba's storage YAML in Python. The sink writes exactly an output's `columns` and names them
in each insert, without `input_format_skip_unknown_fields`: a model field that has no column
fails the insert loudly (and the batch is dead-lettered) instead of vanishing.
tests/integration/test_outputs.py holds each declaration against the real tables after
`migrate`. A new field therefore takes three steps: the model (schemas/), a migration
(infra/clickhouse/migrations/), and for a positional output its place in `columns` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from core import topics
from schemas.alerts import Alert, AlertRule
from schemas.api_keys import ApiKeyEvent
from schemas.audit import AuditRecord
from schemas.events import UsageEvent
from schemas.notifications import Notification, NotificationDelete, NotificationRead
from schemas.stats import StatsRecord

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

JSON_EACH_ROW = "JSONEachRow"  # one JSON object per line, keyed by column name
JSON_COMPACT_EACH_ROW = "JSONCompactEachRow"  # one JSON array per line, in `columns` order


@dataclass(frozen=True)
class Output:
    """One output: the records of `model` in `table`; `topic` carries the same records."""

    name: str
    topic: str  # a name in core.topics (unprefixed); "" for a table no topic carries
    table: str  # in the keypulse database (Settings.clickhouse_database)
    columns: tuple[str, ...]  # what the sink writes, in this order for positional formats
    model: type[msgspec.Struct]
    fmt: str = JSON_EACH_ROW

    def qualified_table(self, database: str) -> str:
        return f"{database}.{self.table}"

    def model_fields(self) -> tuple[str, ...]:
        """The model's field names as encoded (its tag field first, if it has one)."""
        return json_keys(self.model)


def json_keys(model: type[msgspec.Struct]) -> tuple[str, ...]:
    """The keys msgspec writes for `model`: its tag field (if tagged), then every field."""
    info = msgspec.inspect.type_info(model)
    if not isinstance(info, msgspec.inspect.StructType):
        msg = f"{model!r} is not a msgspec Struct"
        raise TypeError(msg)
    tag = (info.tag_field,) if info.tag_field is not None else ()
    return (*tag, *(field.encode_name for field in info.fields))


# The JSON published on Kafka is also the row: one encoding, parsed by ClickHouse in C++.
USAGE_STATS_OUTPUT = Output(
    "usage_stats", topics.USAGE_STATS, "usage_stats", json_keys(StatsRecord), StatsRecord
)
ALERTS_OUTPUT = Output("alerts", topics.USAGE_ALERTS, "alerts", json_keys(Alert), Alert)
NOTIFICATIONS_OUTPUT = Output(
    "notifications", topics.NOTIFICATIONS, "notifications", json_keys(Notification), Notification
)

# A `usage_events_rows` row (pipeline.rows): the validated event's fields in declaration order
# (msgspec.structs.astuple), then the pipeline's columns. ClickHouse parses positional arrays
# in about half the CPU that keyed objects cost; a materialized view moves them into
# `usage_events`.
EVENT_ROWS_OUTPUT = Output(
    "usage_events",
    topics.USAGE_EVENTS,
    "usage_events_rows",
    (
        *(field.name for field in msgspec.structs.fields(UsageEvent)),
        "ts_ms",
        "late",
        "kafka_partition",
        "kafka_offset",
        "ingested_ms",
    ),
    UsageEvent,
    JSON_COMPACT_EACH_ROW,
)

# An `alert_rules` row (rule_row); a delete repeats the last version with
# is_deleted = 1. schema_version comes last so the older positions stay where they were.
ALERT_RULES_OUTPUT = Output(
    "alert_rules",
    topics.ALERT_RULES,
    "alert_rules",
    (
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
        "schema_version",
    ),
    AlertRule,
    JSON_COMPACT_EACH_ROW,
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
        updated_ms / 1000,  # seconds: how ClickHouse reads a JSON number as DateTime64
        rule.schema_version,
    )


# What users do with notifications, and API-key events: written by the API at once and by
# the pipeline from Kafka (whoever produced them), one copy kept (ReplacingMergeTree).
NOTIFICATION_READS_OUTPUT = Output(
    "notification_reads", topics.NOTIFICATIONS, "notification_reads",
    json_keys(NotificationRead), NotificationRead,
)
NOTIFICATION_DELETES_OUTPUT = Output(
    "notification_deletes", topics.NOTIFICATIONS, "notification_deletes",
    json_keys(NotificationDelete), NotificationDelete,
)
API_KEY_EVENTS_OUTPUT = Output(
    "api_key_events", topics.APIKEY_EVENTS, "api_key_events", json_keys(ApiKeyEvent), ApiKeyEvent
)
# The audit trail has no topic: the API writes it before it answers.
AUDIT_OUTPUT = Output("audit_log", "", "audit_log", json_keys(AuditRecord), AuditRecord)

OUTPUTS: tuple[Output, ...] = (
    EVENT_ROWS_OUTPUT,
    USAGE_STATS_OUTPUT,
    ALERTS_OUTPUT,
    NOTIFICATIONS_OUTPUT,
    ALERT_RULES_OUTPUT,
    NOTIFICATION_READS_OUTPUT,
    NOTIFICATION_DELETES_OUTPUT,
    API_KEY_EVENTS_OUTPUT,
    AUDIT_OUTPUT,
)

# Inserts run on one thread (the other core is the dataflow's), skip the merge-on-insert
# (rows come deduplicated or replace their twins later) and have no per-insert partition
# limit: a batch may span every month of the schema's ts range (1,200 monthly partitions at
# most); the default limit of 100 made one user's spread of event times stop the dataflow.
ONE_THREAD = {
    "optimize_on_insert": 0,
    "max_threads": 1,
    "max_insert_threads": 1,
    "input_format_parallel_parsing": 0,
    "max_partitions_per_insert_block": 0,
}
# Unknown fields are an error (the engine's default skips them): every insert names the
# output's columns, so a record field without its column fails loudly instead of vanishing.
_JSON_SETTINGS = {"input_format_skip_unknown_fields": 0, "date_time_input_format": "best_effort",
                  **ONE_THREAD}
# Event rows: `ts` as sent may be a number (kept as text), null means empty for String.
_ROW_SETTINGS = {
    "input_format_skip_unknown_fields": 0,
    "input_format_json_read_numbers_as_strings": 1,
    "input_format_null_as_default": 1,
    **ONE_THREAD,
}
_encoder = msgspec.json.Encoder()


def insert(client: Client, output: Output, database: str, data: bytes) -> None:
    """One insert of an output's encoded records, one per line (event rows as
    pipeline.rows.encode_rows writes them), naming the output's columns."""
    settings = _ROW_SETTINGS if output.fmt == JSON_COMPACT_EACH_ROW else _JSON_SETTINGS
    client.raw_insert(output.qualified_table(database), output.columns, data, fmt=output.fmt,
                      settings=settings)


def insert_records(client: Client, output: Output, database: str,
                   records: list[msgspec.Struct]) -> None:
    """Records of a keyed-JSON output (its model's instances), encoded as on Kafka."""
    insert(client, output, database, b"\n".join(_encoder.encode(r) for r in records))

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

import msgspec

from core import topics
from schemas.alerts import Alert, AlertRule
from schemas.events import UsageEvent
from schemas.notifications import Notification
from schemas.stats import StatsRecord

JSON_EACH_ROW = "JSONEachRow"  # one JSON object per line, keyed by column name
JSON_COMPACT_EACH_ROW = "JSONCompactEachRow"  # one JSON array per line, in `columns` order


@dataclass(frozen=True)
class Output:
    """One output: the records of `model` in `table`; `topic` carries the same records."""

    name: str
    topic: str  # a name in core.topics (unprefixed)
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

# An `alert_rules` row (pipeline.rows.rule_row); a delete repeats the last version with
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

OUTPUTS: tuple[Output, ...] = (
    EVENT_ROWS_OUTPUT,
    USAGE_STATS_OUTPUT,
    ALERTS_OUTPUT,
    NOTIFICATIONS_OUTPUT,
    ALERT_RULES_OUTPUT,
)

"""What flows between the dataflow's steps. Plain NamedTuples: cheap to build and to pickle."""

from __future__ import annotations

from typing import Any, NamedTuple


class SourceBatch(NamedTuple):
    """Records of one Kafka partition from one poll, or an idle tick when `records` is empty.

    `wall_ms` is the source's clock at poll time; `caught_up` says the partition had no
    backlog after this poll, which is when the watermark may advance with wall time.
    """

    partition: int
    records: list[tuple[int, bytes | None, bytes]]  # (offset, key, value)
    wall_ms: int
    caught_up: bool


class DeadLetter(NamedTuple):
    value: bytes
    key: bytes | None
    reason: str
    partition: int
    offset: int


class RuleUpdates(NamedTuple):
    """Decoded `alert.rules` changes, broadcast to every partition's processor."""

    changes: list[Any]  # pipeline.alerting.rules.RuleChange


class EventRows(NamedTuple):
    """Rows for `usage_events_rows`, encoded as the poll batch is processed
    (pipeline.rows.encode_row_into): bytes weigh less than the tuples while they wait for
    their insert."""

    rows: int  # how many
    data: bytes  # JSONCompactEachRow, one row per line
    # The earliest window start (epoch ms) among the rows counted in a window (late rows
    # aside): a stats row must not reach ClickHouse before the events of its window.
    first_window_ms: int


class PartitionOutput(NamedTuple):
    """Everything one step produced, shipped to the sink as one item."""

    partition: int
    event_rows: list[EventRows]
    stats: list[Any]  # schemas.stats.StatsRecord
    dead_letters: list[DeadLetter]
    alerts: list[Any]  # schemas.alerts.Alert
    notifications: list[Any]  # schemas.notifications.Notification
    signals: list[Any]  # pipeline.alerting.incidents.IncidentSignal
    rule_rows: list[tuple[Any, ...]]  # alert_rules rows

    @classmethod
    def empty(cls, partition: int = -1) -> PartitionOutput:
        return cls(partition, [], [], [], [], [], [], [])

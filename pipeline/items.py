"""What flows between the dataflow's steps. Plain NamedTuples: cheap to build and to pickle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # annotations only: importing alerting here would load it with the source
    from pipeline.alerting.incidents import IncidentInput
    from pipeline.alerting.rules import RuleChange
    from schemas.alerts import Alert
    from schemas.api_keys import ApiKeyEvent
    from schemas.notifications import Notification, NotificationDelete, NotificationRead
    from schemas.stats import StatsRecord


class SourceBatch(NamedTuple):
    """Records of one Kafka partition from one poll, or an idle tick when `records` is empty.

    `wall_ms` is the source's clock at poll time; `caught_up` says the partition had no
    backlog after this poll, which is when the watermark may advance with wall time.
    """

    partition: int
    records: list[tuple[int, bytes | None, bytes | None]]  # (offset, key, value); None: null
    wall_ms: int
    caught_up: bool


class TopicBatch(NamedTuple):
    """A poll batch of one of several topics read by one input (`KafkaTopicsSource`):
    `topic` is the unprefixed name (core.topics), which says how to decode the records."""

    topic: str
    batch: SourceBatch


class DeadLetter(NamedTuple):
    """A record for `usage.events.dlq`: the source record's key and value as they were (a
    None value is a tombstone and stays one), why, and where it came from."""

    value: bytes | None
    key: bytes | None
    reason: str
    partition: int
    offset: int


class RuleUpdates(NamedTuple):
    """Decoded `alert.rules` changes, broadcast to every partition's processor."""

    changes: list[RuleChange]


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
    stats: list[StatsRecord]
    dead_letters: list[DeadLetter]
    alerts: list[Alert]
    notifications: list[Notification]
    signals: list[IncidentInput]  # to the incident step, routed by service
    rule_rows: list[tuple[Any, ...]]  # alert_rules rows (core.outputs.rule_row)
    # Records read from `notifications` and `apikey.events` (pipeline.records), whoever
    # produced them: stored in ClickHouse, never published again (they came from Kafka).
    stored_notifications: list[Notification]
    notification_reads: list[NotificationRead]
    notification_deletes: list[NotificationDelete]
    api_key_events: list[ApiKeyEvent]

    @classmethod
    def empty(cls, partition: int = -1) -> PartitionOutput:
        return cls(partition, [], [], [], [], [], [], [], [], [], [], [])

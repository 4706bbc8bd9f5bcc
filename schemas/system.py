"""The system snapshot: what an operator watches, one shape for `GET /v1/admin/system` and the
WebSocket's `system_stats` frame (built by core/system.py).

Every section is measured in the process that answers. A section this process cannot measure
is `null`, and `unavailable` says why, keyed by the section (or `section.field`) it explains:
a `null` is never a zero that looks real.

    process     this process: CPU, memory, uptime
    machine     the host: CPU, memory
    websocket   the bridge's connections and Kafka feed (when a bridge runs in this process)
    kafka       `usage.events` per partition: the log end and its growth (produce rate) from
                Kafka; the pipeline's position, lag and consume rate when it runs here
    pipeline    watermark and freshness: the pipeline's own figures when it runs here, else
                freshness from what ClickHouse holds
    clickhouse  rows, bytes and active parts per table (system.parts; cached a few seconds)

Rates are per second, measured between two snapshots at least a second apart (the first
snapshot of a process has none: `unavailable` says so).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import msgspec


class ProcessStats(msgspec.Struct, kw_only=True, frozen=True):
    pid: int
    cpu_percent: float  # since the previous snapshot; 100 = one core
    memory_rss_bytes: int
    memory_percent: float  # RSS of the machine's memory
    threads: int
    uptime_s: float


class MachineStats(msgspec.Struct, kw_only=True, frozen=True):
    cpu_count: int
    cpu_percent: float  # all cores, since the previous snapshot
    memory_total_bytes: int
    memory_available_bytes: int
    memory_percent: float


class WebSocketStats(msgspec.Struct, kw_only=True, frozen=True):
    """The bridge in this process (its `ws` metrics provider)."""

    connections: int
    users: int
    messages_per_s: float | None  # read from Kafka by the bridge
    skipped_per_s: float | None  # of those, for users with no connection here (never decoded)
    frames_out_per_s: float | None
    consumer_lag: int | None  # the bridge's Kafka consumer, summed over its partitions


class KafkaSource(StrEnum):
    PIPELINE = "pipeline"  # positions of the pipeline in this process, log ends it last saw
    BROKER = "broker"  # log ends asked of Kafka; no consumer position (the pipeline is elsewhere)


class PartitionStats(msgspec.Struct, kw_only=True, frozen=True):
    partition: int
    log_end_offset: int | None  # the high watermark: the next offset produced
    position: int | None  # the next offset the pipeline reads
    lag: int | None  # log_end_offset − position
    produced_per_s: float | None  # growth of the log end
    consumed_per_s: float | None  # growth of the position


class KafkaStats(msgspec.Struct, kw_only=True, frozen=True):
    topic: str  # the pipeline's input, prefixed (`usage.events`)
    source: KafkaSource
    lag: int | None  # summed over the partitions
    partitions: list[PartitionStats]


class PipelineSource(StrEnum):
    PIPELINE = "pipeline"  # the dataflow in this process
    CLICKHOUSE = "clickhouse"  # what the store holds (the dataflow runs elsewhere)


class PipelinePartition(msgspec.Struct, kw_only=True, frozen=True):
    partition: int
    watermark: datetime | None
    newest_event: datetime | None  # the newest event time read
    caught_up: bool | None  # the input was at its log end at the last batch
    idle_s: float | None  # since the partition last handed over a batch


class PipelineStats(msgspec.Struct, kw_only=True, frozen=True):
    source: PipelineSource
    watermark: datetime | None  # the slowest partition's (pipeline only)
    watermark_lag_s: float | None  # now − watermark
    newest_event: datetime | None  # pipeline: newest event time read; clickhouse: stored
    freshness_s: float | None  # now − newest_event
    newest_window_end: datetime | None  # the newest stored stats window's end (ClickHouse)
    window_freshness_s: float | None  # now − newest_window_end
    events_per_s: float | None  # events read by the pipeline (pipeline only)
    partitions: list[PipelinePartition]  # pipeline only


class TableStats(msgspec.Struct, kw_only=True, frozen=True):
    """One table's active parts: rows are before ReplacingMergeTree merges (what count()
    answers without FINAL)."""

    table: str
    rows: int
    bytes_compressed: int
    bytes_uncompressed: int
    parts: int


class ClickHouseStats(msgspec.Struct, kw_only=True, frozen=True):
    database: str
    measured_at: datetime  # cached: the figures are this old
    tables: list[TableStats]  # by name


class SystemSnapshot(msgspec.Struct, kw_only=True, frozen=True):
    """The system as this process sees it (`GET /v1/admin/system`, WebSocket
    `system_stats`)."""

    at: datetime
    process: ProcessStats
    machine: MachineStats
    websocket: WebSocketStats | None
    kafka: KafkaStats | None
    pipeline: PipelineStats | None
    clickhouse: ClickHouseStats | None
    unavailable: dict[str, str]  # section or `section.field` → why it is null

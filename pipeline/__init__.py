"""The Bytewax dataflow: usage.events → deduplicated events and windowed stats (DESIGN §1–§2).

kafka_source   one item per Kafka poll batch (or an idle tick), offsets in recovery snapshots
processor      per-partition state: decode, dedup, watermark, windows → PartitionOutput
dedup          event_id horizon per user, bounded, expiring with event time
windows        watermark and window accumulators; exact percentiles
rows           pure mapping from events and stats to ClickHouse rows
sinks          ClickHouse + Kafka writer, flushed before every snapshot (idempotent replays)
flow           `build_flow(source, sink, ...)`: tests pass TestingSource/TestingSink
runner         `keypulse pipeline`: always with recovery, one process or a cluster
"""

"""The Bytewax dataflow: usage.events → deduplicated events and windowed stats (DESIGN §1–§2).

kafka_source   one item per Kafka poll batch (or an idle tick), offsets in recovery snapshots
processor      per-partition state: decode, dedup, watermark, windows → PartitionOutput
dedup          event_id horizon per user, bounded, expiring with event time
state          the processor's snapshot: STATE_VERSION and the one upgrade() of older ones
windows        watermark and window accumulators; exact percentiles
rows           pure mapping from events and stats to ClickHouse rows
sinks          ClickHouse + Kafka writer, flushed before every snapshot (idempotent replays)
dead_letters   what a DLQ record carries, and a writer that always gets it on the DLQ
flow           `build_flow(source, sink, ...)`: tests pass TestingSource/TestingSink
runner         `keypulse pipeline`: always with recovery, one process or a cluster; health
metrics        counters and per-partition watermarks read by /metrics and /healthz
alerting/      rules, anomaly detection and provider incidents over closed windows
"""

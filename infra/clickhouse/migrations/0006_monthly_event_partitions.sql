-- Raw events move from daily to monthly partitions. A batch of events on 101 distinct days
-- spanned 101 daily partitions, more than one insert may touch (max_partitions_per_insert_block)
-- and the dataflow stopped on it for good. The schema's ts range [2000, 2100) holds 1,200 months
-- and the TTL keeps only the recent ones; the sink also lifts that per-insert limit.
-- ClickHouse cannot change a partition key in place: build the new table, copy the rows,
-- exchange the two names, drop the old one. The materialized view usage_events_rows_mv
-- writes to `usage_events` by name, so it follows the exchange. Run with the pipeline stopped;
-- an interrupted run starts over from the first statement (each one tolerates a rerun).
-- The TTL below is a placeholder: R__events_ttl runs again after every versioned migration.

DROP TABLE IF EXISTS {db}.usage_events_monthly;

CREATE TABLE {db}.usage_events_monthly
(
    event_id        String,
    ts              DateTime64(3, 'UTC'),
    user_id         String,
    api_key_id      String,
    service         LowCardinality(String),
    status_code     UInt16,
    latency_ms      Float64,
    endpoint        String,
    method          LowCardinality(String),
    tokens_in       Nullable(UInt64),
    tokens_out      Nullable(UInt64),
    cost_usd        Nullable(Float64),
    request_bytes   Nullable(UInt64),
    response_bytes  Nullable(UInt64),
    error_type      LowCardinality(String),
    region          LowCardinality(String),
    sdk             LowCardinality(String),
    schema_version  UInt8,
    late            Bool,
    kafka_partition UInt16,
    kafka_offset    UInt64,
    ingested_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (user_id, service, ts, event_id)
TTL toDateTime(ts) + INTERVAL 30 DAY;

INSERT INTO {db}.usage_events_monthly
SELECT event_id, ts, user_id, api_key_id, service, status_code, latency_ms, endpoint, method,
       tokens_in, tokens_out, cost_usd, request_bytes, response_bytes, error_type, region, sdk,
       schema_version, late, kafka_partition, kafka_offset, ingested_at
FROM {db}.usage_events
SETTINGS max_partitions_per_insert_block = 0;

EXCHANGE TABLES {db}.usage_events AND {db}.usage_events_monthly;

DROP TABLE {db}.usage_events_monthly;

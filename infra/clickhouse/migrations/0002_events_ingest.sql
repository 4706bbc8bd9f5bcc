-- Raw events enter through a Null table and a materialized view: the dataflow sends each
-- validated event as one JSON line (re-encoded, known fields only) plus `__kp`
-- [ts_ms, late, kafka_partition, kafka_offset, ingested_ms], and ClickHouse parses the
-- batch in C++. Serialising rows in Python cost more than everything else per event.

CREATE TABLE IF NOT EXISTS {db}.usage_events_ingest
(
    event_id        String,
    user_id         String,
    api_key_id      String,
    service         String,
    status_code     UInt16,
    latency_ms      Float64,
    endpoint        String,
    method          String,
    tokens_in       Nullable(UInt64),
    tokens_out      Nullable(UInt64),
    cost_usd        Nullable(Float64),
    request_bytes   Nullable(UInt64),
    response_bytes  Nullable(UInt64),
    error_type      String,
    region          String,
    sdk             String,
    schema_version  UInt8 DEFAULT 1,
    __kp            Array(Int64)
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_events_ingest_mv TO {db}.usage_events AS
SELECT
    event_id,
    fromUnixTimestamp64Milli(__kp[1], 'UTC') AS ts,
    user_id,
    api_key_id,
    service,
    status_code,
    latency_ms,
    endpoint,
    upper(method) AS method,
    tokens_in,
    tokens_out,
    cost_usd,
    request_bytes,
    response_bytes,
    error_type,
    region,
    sdk,
    schema_version,
    __kp[2] != 0 AS late,
    toUInt16(__kp[3]) AS kafka_partition,
    toUInt64(__kp[4]) AS kafka_offset,
    fromUnixTimestamp64Milli(__kp[5], 'UTC') AS ingested_at
FROM {db}.usage_events_ingest;

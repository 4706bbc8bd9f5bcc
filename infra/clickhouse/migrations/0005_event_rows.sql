-- Raw events now enter as JSONCompactEachRow rows [ts_ms, late, kafka_partition,
-- kafka_offset, ingested_ms, event]: `event` is the validated event as msgspec encodes it, read
-- into a named tuple. The dataflow's thread builds a 6-tuple per event and encodes each poll
-- batch in one call; parsing the rows is left to ClickHouse's threads.
-- (tests/integration/test_event_rows.py keeps this layout and UsageEvent in step.)

DROP VIEW IF EXISTS {db}.usage_events_ingest_mv;
DROP TABLE IF EXISTS {db}.usage_events_ingest;

CREATE TABLE IF NOT EXISTS {db}.usage_events_rows
(
    ts_ms           Int64,
    late            Bool,
    kafka_partition UInt16,
    kafka_offset    UInt64,
    ingested_ms     Int64,
    event           Tuple(
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
        schema_version  UInt8
    )
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_events_rows_mv TO {db}.usage_events AS
SELECT
    event.event_id AS event_id,
    fromUnixTimestamp64Milli(ts_ms, 'UTC') AS ts,
    event.user_id AS user_id,
    event.api_key_id AS api_key_id,
    event.service AS service,
    event.status_code AS status_code,
    event.latency_ms AS latency_ms,
    event.endpoint AS endpoint,
    upper(event.method) AS method,
    event.tokens_in AS tokens_in,
    event.tokens_out AS tokens_out,
    event.cost_usd AS cost_usd,
    event.request_bytes AS request_bytes,
    event.response_bytes AS response_bytes,
    event.error_type AS error_type,
    event.region AS region,
    event.sdk AS sdk,
    event.schema_version AS schema_version,
    late,
    kafka_partition,
    kafka_offset,
    fromUnixTimestamp64Milli(ingested_ms, 'UTC') AS ingested_at
FROM {db}.usage_events_rows;

-- keypulse schema v1 (DESIGN §4). `user_id` leads every ORDER BY: tenant isolation and pruning.
-- Every table is a ReplacingMergeTree keyed by the identity of what it stores, because the
-- dataflow replays after a crash: a replayed row replaces its twin, never adds to it.
-- Read exact figures with FINAL (or argMax by the version column) until merges catch up.

CREATE TABLE IF NOT EXISTS {db}.usage_events
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
PARTITION BY toYYYYMMDD(ts)
ORDER BY (user_id, service, ts, event_id)
TTL toDateTime(ts) + INTERVAL 30 DAY;  -- R__events_ttl applies KEYPULSE_EVENTS_TTL_DAYS

CREATE TABLE IF NOT EXISTS {db}.usage_stats
(
    user_id           String,
    service           LowCardinality(String),
    window_start      DateTime64(3, 'UTC'),
    window_end        DateTime64(3, 'UTC'),
    window_seconds    UInt32,
    requests          UInt64,
    successes         UInt64,
    client_errors     UInt64,
    server_errors     UInt64,
    success_rate      Float64,
    error_rate        Float64,
    server_error_rate Float64,
    latency_avg_ms    Float64,
    latency_p50_ms    Float64,
    latency_p95_ms    Float64,
    latency_p99_ms    Float64,
    latency_max_ms    Float64,
    tokens_in         UInt64,
    tokens_out        UInt64,
    cost_usd          Float64,
    emitted_at        DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(emitted_at)
PARTITION BY toYYYYMM(window_start)
ORDER BY (user_id, service, window_seconds, window_start);

CREATE TABLE IF NOT EXISTS {db}.alerts
(
    alert_id     String,
    rule_id      String,
    rule_name    String,
    user_id      String,
    service      LowCardinality(String),
    metric       LowCardinality(String),
    op           LowCardinality(String),
    threshold    Float64,
    value        Float64,
    severity     LowCardinality(String),
    state        LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end   DateTime64(3, 'UTC'),
    fired_at     DateTime64(3, 'UTC'),
    resolved_at  Nullable(DateTime64(3, 'UTC')),
    message      String,
    emitted_at   DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(emitted_at)
PARTITION BY toYYYYMM(fired_at)
ORDER BY (user_id, alert_id, state);

CREATE TABLE IF NOT EXISTS {db}.alert_rules
(
    rule_id         String,
    user_id         String,
    name            String,
    metric          LowCardinality(String),
    op              LowCardinality(String),
    threshold       Float64,
    service         Nullable(String),
    for_windows     UInt16,
    resolve_windows UInt16,
    min_requests    UInt32,
    severity        LowCardinality(String),
    enabled         Bool,
    version         UInt64,
    is_deleted      UInt8,
    updated_at      DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY (user_id, rule_id);

CREATE TABLE IF NOT EXISTS {db}.notifications
(
    notification_id String,
    user_id         String,
    type            LowCardinality(String),
    template        LowCardinality(String),
    title           String,
    message         String,
    data            Map(String, String),
    created_at      DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(created_at)
PARTITION BY toYYYYMM(created_at)
ORDER BY (user_id, notification_id);

-- Read/unread is state that changes; it lives beside the immutable notification.
CREATE TABLE IF NOT EXISTS {db}.notification_reads
(
    notification_id String,
    user_id         String,
    read            Bool,
    at              DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(at)
ORDER BY (user_id, notification_id);

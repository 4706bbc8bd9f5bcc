-- Mergeable percentiles and replay-safe rollups (DESIGN §2, §8; docs/analytics.md).
--
-- Each stats row carries its window's latency sketch (core/sketch.py: bin keys ascending and
-- their counts) and the latencies' exact sum, so a range's percentiles come from the merged
-- bins (`sumMap`) and its average from the sums: never an average of window percentiles.
-- Windows written before this migration carry no bins.
ALTER TABLE {db}.usage_stats ADD COLUMN IF NOT EXISTS latency_sum_ms Float64 DEFAULT latency_avg_ms * requests;
ALTER TABLE {db}.usage_stats ADD COLUMN IF NOT EXISTS latency_bins Array(Int16);
ALTER TABLE {db}.usage_stats ADD COLUMN IF NOT EXISTS latency_bin_counts Array(UInt32);

-- Rollups of the closed windows per (user_id, service) and minute, hour and day. A rollup row
-- is recomputed from its source (the windows FINAL, or the finer rollup FINAL) whenever a
-- window of its bucket is written, never added to: a window the pipeline replays after a
-- crash replaces its twin, the bucket is recomputed to the same figures, and the new row
-- replaces the old one (version `computed_at`). A materialized view summing on insert would
-- count the replayed window twice. Read them with FINAL. Retention: R__rollup_ttl.sql.
CREATE TABLE IF NOT EXISTS {db}.usage_rollup_1m
(
    user_id            String,
    service            LowCardinality(String),
    bucket_start       DateTime('UTC'),
    windows            UInt32,
    requests           UInt64,
    successes          UInt64,
    client_errors      UInt64,
    server_errors      UInt64,
    latency_sum_ms     Float64,
    latency_max_ms     Float64,
    latency_bins       Array(Int16),
    latency_bin_counts Array(UInt64),
    tokens_in          UInt64,
    tokens_out         UInt64,
    cost_usd           Float64,
    computed_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMM(bucket_start)
ORDER BY (user_id, service, bucket_start);

CREATE TABLE IF NOT EXISTS {db}.usage_rollup_1h AS {db}.usage_rollup_1m
ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMM(bucket_start)
ORDER BY (user_id, service, bucket_start);

CREATE TABLE IF NOT EXISTS {db}.usage_rollup_1d AS {db}.usage_rollup_1m
ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYear(bucket_start)
ORDER BY (user_id, service, bucket_start);

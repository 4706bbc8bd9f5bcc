-- Repeatable: retention of the 10 s stats and of each rollup (KEYPULSE_STATS_TTL_DAYS,
-- KEYPULSE_ROLLUP_1M_TTL_DAYS, _1H_, _1D_); raw events: R__events_ttl.sql.
-- requires: 0008
ALTER TABLE {db}.usage_stats MODIFY TTL toDateTime(window_start) + INTERVAL {stats_ttl_days} DAY;
ALTER TABLE {db}.usage_rollup_1m MODIFY TTL bucket_start + INTERVAL {rollup_1m_ttl_days} DAY;
ALTER TABLE {db}.usage_rollup_1h MODIFY TTL bucket_start + INTERVAL {rollup_1h_ttl_days} DAY;
ALTER TABLE {db}.usage_rollup_1d MODIFY TTL bucket_start + INTERVAL {rollup_1d_ttl_days} DAY;

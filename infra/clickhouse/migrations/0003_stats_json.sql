-- Stats rows arrive as the same JSON the dataflow publishes on usage.stats; the version
-- column of the ReplacingMergeTree is stamped by the server on insert.
ALTER TABLE {db}.usage_stats MODIFY COLUMN emitted_at DateTime64(3, 'UTC') DEFAULT now64(3);

-- Alerts arrive as the same JSON the dataflow publishes on usage.alerts; the version column
-- of the ReplacingMergeTree is stamped by the server on insert.
ALTER TABLE {db}.alerts MODIFY COLUMN emitted_at DateTime64(3, 'UTC') DEFAULT now64(3);

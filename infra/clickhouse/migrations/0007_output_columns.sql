-- Every field of an output's model has its column (core/outputs.py): the sink no longer skips
-- unknown JSON keys, so a field without a column fails loudly instead of disappearing.
-- `schema_version` of each record, and the tag `kind` that a notification carries on Kafka.

ALTER TABLE {db}.usage_stats ADD COLUMN IF NOT EXISTS schema_version UInt8 DEFAULT 1;
ALTER TABLE {db}.alerts ADD COLUMN IF NOT EXISTS schema_version UInt8 DEFAULT 1;
ALTER TABLE {db}.notifications ADD COLUMN IF NOT EXISTS schema_version UInt8 DEFAULT 1;
ALTER TABLE {db}.notifications
    ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT 'notification';
ALTER TABLE {db}.alert_rules ADD COLUMN IF NOT EXISTS schema_version UInt8 DEFAULT 1;

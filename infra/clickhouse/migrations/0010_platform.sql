-- The platform side of the API (DESIGN §8; docs/api.md): durable read state and deletions of
-- notifications, API-key lifecycle events and the audit trail.
--
-- Every row has an identity and a version, so the API (which writes at once, for
-- read-your-writes) and the pipeline (which writes what any process put on Kafka, and
-- replays after a crash) may both write one: ReplacingMergeTree keeps one copy. Read FINAL.

-- A read-state change as it travels on `notifications` (kind `read`).
ALTER TABLE {db}.notification_reads
    ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT 'read';
ALTER TABLE {db}.notification_reads ADD COLUMN IF NOT EXISTS schema_version UInt8 DEFAULT 1;

-- A user removed a notification from their own history (for a system-wide one, from theirs
-- only). Final: kept apart from the read state so a later read cannot bring it back.
CREATE TABLE IF NOT EXISTS {db}.notification_deletes
(
    kind            LowCardinality(String) DEFAULT 'delete',
    notification_id String,
    user_id         String,
    at              DateTime64(3, 'UTC'),
    schema_version  UInt8 DEFAULT 1
)
ENGINE = ReplacingMergeTree(at)
ORDER BY (user_id, notification_id);

-- `apikey.events` (schemas/api_keys.py): who declared what happened to which key.
CREATE TABLE IF NOT EXISTS {db}.api_key_events
(
    event_id       String,
    user_id        String,
    action         LowCardinality(String),
    api_key_id     String,
    service        LowCardinality(String),
    name           String,
    at             DateTime64(3, 'UTC'),
    declared_by    LowCardinality(String),
    schema_version UInt8 DEFAULT 1
)
ENGINE = ReplacingMergeTree(at)
PARTITION BY toYYYYMM(at)
ORDER BY (user_id, event_id);

-- Who changed what, when, from where (schemas/audit.py). Never a secret or a token.
CREATE TABLE IF NOT EXISTS {db}.audit_log
(
    audit_id       String,
    at             DateTime64(3, 'UTC'),
    actor          String,
    roles          Array(LowCardinality(String)),
    action         LowCardinality(String),
    target         String,
    user_id        String,
    remote_addr    String,
    user_agent     String,
    details        Map(String, String),
    schema_version UInt8 DEFAULT 1
)
ENGINE = ReplacingMergeTree(at)
PARTITION BY toYYYYMM(at)
ORDER BY (at, audit_id);

-- Repeatable: applied whenever its rendered text changes (KEYPULSE_EVENTS_TTL_DAYS).
ALTER TABLE {db}.usage_events MODIFY TTL toDateTime(ts) + INTERVAL {events_ttl_days} DAY;

"""The one definition of keypulse's Kafka topics (DESIGN §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_MS = 86_400_000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    description: str
    config: dict[str, str] = field(default_factory=dict)
    partitioned: bool = True  # False: a single partition regardless of the setting


USAGE_EVENTS = "usage.events"
USAGE_EVENTS_DLQ = "usage.events.dlq"
USAGE_STATS = "usage.stats"
USAGE_ALERTS = "usage.alerts"
ALERT_RULES = "alert.rules"
NOTIFICATIONS = "notifications"
APIKEY_EVENTS = "apikey.events"

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        USAGE_EVENTS, "usage events from SDKs, key = user_id", {"retention.ms": str(7 * DAY_MS)}
    ),
    TopicSpec(
        USAGE_EVENTS_DLQ,
        "rejected events: original bytes + reason + source offset",
        {"retention.ms": str(30 * DAY_MS)},
    ),
    TopicSpec(USAGE_STATS, "closed window stats, key = user_id", {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(
        USAGE_ALERTS, "alert state changes, key = user_id", {"retention.ms": str(30 * DAY_MS)}
    ),
    TopicSpec(
        ALERT_RULES,
        "alert rules, key = rule_id; latest value wins, null deletes",
        {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(DAY_MS)},
    ),
    TopicSpec(
        NOTIFICATIONS,
        "notifications and read-state changes, key = user_id",
        {"retention.ms": str(30 * DAY_MS)},
    ),
    TopicSpec(
        APIKEY_EVENTS,
        "api key created/updated/deleted, key = user_id",
        {"retention.ms": str(30 * DAY_MS)},
    ),
)

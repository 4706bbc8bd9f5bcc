"""The shared contract: one typed, versioned model per message (DESIGN §1–§3, §7).

Models are msgspec Structs: validation happens in C while decoding, which keeps the
hot path (Kafka bytes → validated `UsageEvent`) well above 300,000 events/s per core.
`schemas.export` writes their JSON Schema for SDK authors in other languages.
"""

from schemas.alerts import Alert, AlertRule, AlertState, Metric, Op, Severity
from schemas.events import InvalidEvent, UsageEvent, decode_event, encode_event
from schemas.notifications import Notification, NotificationRead
from schemas.stats import StatsRecord

__all__ = [
    "Alert",
    "AlertRule",
    "AlertState",
    "InvalidEvent",
    "Metric",
    "Notification",
    "NotificationRead",
    "Op",
    "Severity",
    "StatsRecord",
    "UsageEvent",
    "decode_event",
    "encode_event",
]

"""Alerting core (DESIGN §3): pure, in-memory, picklable; no Kafka, ClickHouse or Bytewax.

What the dataflow calls:

* `RuleBook` ← every `alert.rules` message: `book.apply(decode_rule_message(key, value))`
  (`InvalidRuleMessage` → dead-letter it).
* `AlertEvaluator.on_window(stats, book.rules_for(user_id, service))` → `list[Alert]` once
  per closed window; each alert → `usage.alerts` / `alerts`, and `notification_for(alert)`
  → `notifications`.
* `AlertEvaluator.on_idle(watermark_ms)` → `list[Alert]`, whenever event time advances.
* `incident_signal(evaluator, stats)` and `TrafficHistory` (only users with real traffic
  history count) → `IncidentSignal` / `PopulationChange` → route by service →
  `IncidentCounter.on_item` → an optional system-wide `Notification`.
* `AlertEvaluator.prune` / `TrafficHistory.prune` / `RuleBook.age_cache`: idle keys' state
  goes, so per-(user, service) state stays bounded.

`AlertingHook` (hook.py) packages all but the counter for the partition processor.
"""

from pipeline.alerting.anomaly import AnomalyConfig, AnomalyDetector, AnomalyScore
from pipeline.alerting.evaluator import AlertEvaluator, EvaluatorConfig, alert_id
from pipeline.alerting.hook import AlertingHook
from pipeline.alerting.incidents import (
    IncidentConfig,
    IncidentCounter,
    IncidentInput,
    IncidentSignal,
    PopulationChange,
    TrafficHistory,
    incident_notification,
    incident_signal,
)
from pipeline.alerting.notify import notification_for, notification_id
from pipeline.alerting.rules import (
    InvalidRuleMessage,
    RuleBook,
    RuleChange,
    decode_rule_message,
)
from schemas.alerts import GLOBAL_USER, default_rule_id, default_rules, instance_id

__all__ = [
    "GLOBAL_USER",
    "AlertEvaluator",
    "AlertingHook",
    "AnomalyConfig",
    "AnomalyDetector",
    "AnomalyScore",
    "EvaluatorConfig",
    "IncidentConfig",
    "IncidentCounter",
    "IncidentInput",
    "IncidentSignal",
    "InvalidRuleMessage",
    "PopulationChange",
    "RuleBook",
    "RuleChange",
    "TrafficHistory",
    "alert_id",
    "decode_rule_message",
    "default_rule_id",
    "default_rules",
    "incident_notification",
    "incident_signal",
    "instance_id",
    "notification_for",
    "notification_id",
]

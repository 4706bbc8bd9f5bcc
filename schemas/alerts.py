"""Alert rules and alert records (DESIGN §3)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated

import msgspec

from schemas.notifications import SYSTEM_USER


class Metric(StrEnum):
    ERROR_RATE = "error_rate"
    SERVER_ERROR_RATE = "server_error_rate"
    SUCCESS_RATE = "success_rate"
    LATENCY_P50_MS = "latency_p50_ms"
    LATENCY_P95_MS = "latency_p95_ms"
    LATENCY_P99_MS = "latency_p99_ms"
    LATENCY_AVG_MS = "latency_avg_ms"
    REQUESTS = "requests"
    COST_USD = "cost_usd"
    TOKENS = "tokens"
    REQUESTS_ANOMALY = "requests_anomaly"


class Op(StrEnum):
    GT = ">"
    GE = ">="
    LT = "<"
    LE = "<="


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertState(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class AlertRule(msgspec.Struct, kw_only=True, frozen=True):
    """A threshold (or anomaly) rule. Key on `alert.rules` is `rule_id`; a null value deletes."""

    rule_id: Name
    user_id: Name
    name: Name
    metric: Metric
    op: Op = Op.GT
    threshold: Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]
    service: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")] | None = None
    for_windows: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    resolve_windows: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    min_requests: Annotated[int, msgspec.Meta(ge=0)] = 20
    severity: Severity = Severity.WARNING
    enabled: bool = True
    version: Annotated[int, msgspec.Meta(ge=0)] = 0
    schema_version: int = 1


class Alert(msgspec.Struct, kw_only=True, frozen=True):
    """One alert state change. `firing` and its `resolved` share `alert_id`."""

    alert_id: str
    rule_id: str
    rule_name: str
    user_id: str
    service: str
    metric: Metric
    op: Op
    threshold: float
    value: float
    severity: Severity
    state: AlertState
    window_start: datetime
    window_end: datetime
    fired_at: datetime
    resolved_at: datetime | None = None
    message: str = ""
    schema_version: int = 1


GLOBAL_USER = SYSTEM_USER
"""`user_id` of a template rule that applies to every user."""

DEFAULT_PREFIX = "default"


def default_rule_id(user_id: str, name: str) -> str:
    """`default:{user_id}:{name}`, the id a default has for one user."""
    return f"{DEFAULT_PREFIX}:{user_id}:{name}"


def default_rules() -> tuple[AlertRule, ...]:
    """The built-in templates (DESIGN §3), `user_id` "*"."""
    return (
        AlertRule(
            rule_id=default_rule_id(GLOBAL_USER, "error_rate"), user_id=GLOBAL_USER,
            name="Error rate above 5%", metric=Metric.ERROR_RATE, op=Op.GT, threshold=0.05,
            for_windows=2, severity=Severity.WARNING,
        ),
        AlertRule(
            rule_id=default_rule_id(GLOBAL_USER, "latency_p95_ms"), user_id=GLOBAL_USER,
            name="p95 latency above 2 s", metric=Metric.LATENCY_P95_MS, op=Op.GT,
            threshold=2000.0, for_windows=2, severity=Severity.WARNING,
        ),
        AlertRule(
            rule_id=default_rule_id(GLOBAL_USER, "requests_anomaly"), user_id=GLOBAL_USER,
            name="Request volume spike", metric=Metric.REQUESTS_ANOMALY, op=Op.GT,
            threshold=4.0, severity=Severity.INFO,
        ),
    )


def instance_id(template_id: str, user_id: str) -> str:
    """The id a template (`user_id` "*") has for one user: `default:*:x` → `default:bob:x`;
    an id without `:*:` gets `:{user_id}` appended."""
    marker = f":{GLOBAL_USER}:"
    if marker in template_id:
        return template_id.replace(marker, f":{user_id}:", 1)
    return f"{template_id}:{user_id}"


def template_instances(user_id: str, own: Mapping[str, AlertRule], templates: Iterable[AlertRule]
                       ) -> Iterator[tuple[AlertRule, tuple[str, ...]]]:
    """Each template as it applies to `user_id` with the user's rules `own` (by id): its
    instance, and the ids of the user's rules that take its place (empty: it applies).

    A user's rule replaces a template when its id is the template's instance id (how a user
    edits or disables a default; deleting it brings the default back), or when it has the
    template's metric and no service filter; enabled or not. The pipeline (RuleBook) and the
    API (GET /v1/alert-rules) both read this, so the list shows what is evaluated."""
    unfiltered: dict[Metric, list[str]] = {}
    for rule in own.values():
        if rule.service is None:
            unfiltered.setdefault(rule.metric, []).append(rule.rule_id)
    for template in templates:
        rule_id = instance_id(template.rule_id, user_id)
        by_metric = [other for other in unfiltered.get(template.metric, ()) if other != rule_id]
        replaced_by = (rule_id, *by_metric) if rule_id in own else tuple(by_metric)
        yield msgspec.structs.replace(template, rule_id=rule_id, user_id=user_id), replaced_by


def effective_rules(user_id: str, own: Mapping[str, AlertRule], templates: Iterable[AlertRule]
                    ) -> list[AlertRule]:
    """The rules in force for `user_id` (disabled ones included): their own, then the
    templates no rule of theirs replaces (`template_instances`)."""
    rules = list(own.values())
    if user_id != GLOBAL_USER:
        rules += [rule for rule, replaced_by in template_instances(user_id, own, templates)
                  if not replaced_by]
    return rules

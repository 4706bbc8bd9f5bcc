"""Alert rules and alert records (DESIGN §3)."""

from __future__ import annotations

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

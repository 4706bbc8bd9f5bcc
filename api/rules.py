"""Alert rules as the API serves them (DESIGN §3, §8): the request bodies and their checks, a
user's effective rules read back from `alert_rules`, and how a change is published and stored.

    RuleInput / RuleReplacement   the bodies of POST and PUT (unknown fields refused)
    parse(body, kind)             decoded and checked; 422 naming the field at fault
    load(client, db, user)        UserRules: the user's rules and the templates, as stored
    UserRules.views()             the list the pipeline evaluates for that user
    publish(...), store(...)      onto `alert.rules` (Kafka confirmed) and into `alert_rules`

Effective rules are `schemas.alerts.effective_rules`, the very function the pipeline's
RuleBook evaluates with: the user's own rules, then each template (the built-in defaults,
replaced by an admin's `user_id` "*" rule of the same id) as `default:{user}:{name}`, unless a
rule of the user's replaces it (its id is the default's, or it has the default's metric and
no service filter).

Versions. The API gives a new rule version 1 and each update the stored version + 1; an
override of a default starts above both the template's version and any version of that id
deleted before (the pipeline ignores an upsert at or below a deleted version). Changes of
one user are serialised within a process (`lock_for`). Two API replicas racing on one rule
may both write the same next version: the pipeline applies equal versions in topic order
(the last one wins there and in `alert_rules`, a ReplacingMergeTree), lower ones never.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
from clickhouse_connect.driver.client import Client

from api.errors import APIError
from api.ingest import EventProducer, retry_after
from core.outputs import ALERT_RULES_OUTPUT, insert, rule_row
from core.settings import Settings
from core.topics import ALERT_RULES
from schemas.alerts import (
    GLOBAL_USER,
    AlertRule,
    Metric,
    Name,
    Op,
    Severity,
    default_rules,
    effective_rules,
    template_instances,
)
from schemas.events import SERVICE_PATTERN

logger = logging.getLogger(__name__)

MAX_RULES_PER_USER = 100  # a user's own rules (overrides of defaults included)
MAX_BODY_BYTES = 16 * 1024
MAX_THRESHOLD = 1e15
RATES = frozenset({Metric.ERROR_RATE, Metric.SERVER_ERROR_RATE, Metric.SUCCESS_RATE})
LATENCIES = frozenset({Metric.LATENCY_P50_MS, Metric.LATENCY_P95_MS, Metric.LATENCY_P99_MS,
                       Metric.LATENCY_AVG_MS})
MAX_LATENCY_MS = 3_600_000.0  # an event's latency_ms is at most an hour (schemas.events)
MAX_Z = 1_000.0  # requests_anomaly compares a z-score

Windows = Annotated[int, msgspec.Meta(ge=1, le=1000, description="consecutive windows, 1-1000")]


class RuleInput(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A rule as a user writes it (DESIGN §3); the API assigns `rule_id`, `user_id` and
    `version`."""

    name: Name
    metric: Metric
    op: Op = Op.GT
    threshold: Annotated[float, msgspec.Meta(
        ge=-MAX_THRESHOLD, le=MAX_THRESHOLD,
        description="rates in [0, 1]; latencies 0-3600000 ms; requests, tokens, cost >= 0; "
                    "requests_anomaly a z-score in [-1000, 1000]")]
    service: Annotated[str, msgspec.Meta(pattern=SERVICE_PATTERN, description=(
        "only this service's windows; absent (null): every service"))] | None = None
    for_windows: Windows = 1
    resolve_windows: Windows = 1
    min_requests: Annotated[int, msgspec.Meta(
        ge=0, le=4_294_967_295, description="a window with fewer requests is no data")] = 20
    severity: Severity = Severity.WARNING
    enabled: bool = True


class RuleReplacement(RuleInput, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The whole rule again (PUT), and optionally the `version` it replaces (or If-Match)."""

    version: Annotated[int, msgspec.Meta(
        ge=0, description="the stored version this replaces (instead of If-Match)")] | None = None


class RuleView(msgspec.Struct, kw_only=True, frozen=True):
    """A rule as the pipeline evaluates it for its user."""

    rule_id: str
    user_id: str
    name: str
    metric: Metric
    op: Op
    threshold: float
    service: str | None
    for_windows: int
    resolve_windows: int
    min_requests: int
    severity: Severity
    enabled: bool
    version: int
    default: bool  # a default (template) as it applies to this user
    overrides: list[str]  # for the user's own rule: the defaults it takes the place of
    overridden_by: list[str]  # for a default: the user's rules replacing it (then not listed)
    updated_at: datetime | None  # when this version was stored; null for a built-in default


class RuleList(msgspec.Struct, frozen=True):
    items: list[RuleView]
    next_cursor: str | None = None  # every rule is on the one page


_AT_FIELD = re.compile(r"at `\$\.([A-Za-z0-9_]+)")
_NAMED_FIELD = re.compile(r"field `([^`]{1,64})`")


Body = TypeVar("Body", bound=RuleInput)


def parse(body: bytes, kind: type[Body]) -> Body:
    """The body as `kind`, checked (`check`); 422 naming the field, 400 when not JSON."""
    try:
        found = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT_FIELD.search(text) or _NAMED_FIELD.search(text)
        raise APIError(422, "invalid_request", text,
                       field=match.group(1) if match else None) from None
    except msgspec.DecodeError as exc:
        raise APIError(400, "bad_request", f"the body is not JSON: {exc}") from None
    check(found)
    return found


def check(rule: RuleInput) -> None:
    """What the body's schema cannot say: a threshold that makes sense for its metric."""
    value, metric = rule.threshold, rule.metric
    if metric in RATES:
        low, high, what = 0.0, 1.0, "a rate: a fraction in [0, 1]"
    elif metric in LATENCIES:
        low, high, what = 0.0, MAX_LATENCY_MS, f"milliseconds in [0, {MAX_LATENCY_MS:.0f}]"
    elif metric is Metric.REQUESTS_ANOMALY:
        low, high, what = -MAX_Z, MAX_Z, f"a z-score in [-{MAX_Z:.0f}, {MAX_Z:.0f}]"
    else:
        low, high, what = 0.0, MAX_THRESHOLD, "a count or an amount: >= 0"
    if not low <= value <= high:  # NaN fails too
        msg = f"threshold: {metric.value} takes {what}, got {value!r}"
        raise APIError(422, "invalid_request", msg, field="threshold")


def new_rule(fields: RuleInput, *, rule_id: str, user_id: str, version: int) -> AlertRule:
    values = {name: getattr(fields, name) for name in RuleInput.__struct_fields__}
    return AlertRule(rule_id=rule_id, user_id=user_id, version=version, **values)


# --- reading ----------------------------------------------------------------------------

_COLUMNS = ("rule_id, user_id, name, metric, op, threshold, service, for_windows, "
            "resolve_windows, min_requests, severity, enabled, version, "
            "toUnixTimestamp64Milli(updated_at)")


@dataclass(frozen=True)
class UserRules:
    """One user's rules as stored (`own`, by id) and the templates in force."""

    user_id: str
    own: dict[str, AlertRule]
    templates: tuple[AlertRule, ...]
    updated_ms: dict[str, int] = field(default_factory=dict)  # rule_id → when stored

    def views(self) -> list[RuleView]:
        """The effective rules (schemas.alerts.effective_rules), marked: the user's own
        (with the defaults each replaces), then the defaults that apply."""
        replacing: dict[str, list[str]] = {}
        for instance, replaced_by in template_instances(self.user_id, self.own, self.templates):
            for rule_id in replaced_by:
                replacing.setdefault(rule_id, []).append(instance.rule_id)
        return [self.view(rule, default=rule.rule_id not in self.own,
                          overrides=replacing.get(rule.rule_id, []))
                for rule in effective_rules(self.user_id, self.own, self.templates)]

    def default(self, rule_id: str) -> tuple[AlertRule, tuple[str, ...]] | None:
        """The default whose per-user id is `rule_id`, and the rules replacing it."""
        for instance, replaced_by in template_instances(self.user_id, self.own, self.templates):
            if instance.rule_id == rule_id:
                return instance, replaced_by
        return None

    def find(self, rule_id: str) -> RuleView | None:
        """The caller's rule or default `rule_id` (a replaced default too), else None."""
        rule = self.own.get(rule_id)
        if rule is not None:
            return next(view for view in self.views() if view.rule_id == rule_id)
        found = self.default(rule_id)
        if found is None:
            return None
        instance, replaced_by = found
        return self.view(instance, default=True, overridden_by=list(replaced_by))

    def view(self, rule: AlertRule, *, default: bool, overrides: Sequence[str] = (),
             overridden_by: Sequence[str] = ()) -> RuleView:
        stored_ms = None if default else self.updated_ms.get(rule.rule_id)
        return RuleView(
            rule_id=rule.rule_id, user_id=rule.user_id, name=rule.name, metric=rule.metric,
            op=rule.op, threshold=rule.threshold, service=rule.service,
            for_windows=rule.for_windows, resolve_windows=rule.resolve_windows,
            min_requests=rule.min_requests, severity=rule.severity, enabled=rule.enabled,
            version=rule.version, default=default, overrides=list(overrides),
            overridden_by=list(overridden_by),
            updated_at=None if stored_ms is None else datetime.fromtimestamp(stored_ms / 1000,
                                                                              tz=UTC))


def _rule(row: Sequence[Any]) -> AlertRule:
    (rule_id, user_id, name, metric, op, threshold, service, for_windows, resolve_windows,
     min_requests, severity, enabled, version, _updated) = row
    return AlertRule(rule_id=str(rule_id), user_id=str(user_id), name=str(name),
                     metric=Metric(metric), op=Op(op), threshold=float(threshold),
                     service=None if service is None else str(service),
                     for_windows=int(for_windows), resolve_windows=int(resolve_windows),
                     min_requests=int(min_requests), severity=Severity(severity),
                     enabled=bool(enabled), version=int(version))


def load(client: Client, database: str, user_id: str) -> UserRules:
    """`user_id`'s rules and the templates, from `alert_rules` FINAL (a deleted rule is
    gone); a template an admin deleted is gone too, as in the pipeline."""
    rows = client.query(
        f"SELECT {_COLUMNS} FROM {database}.alert_rules FINAL "
        "WHERE user_id IN ({user:String}, {all:String}) ORDER BY user_id, rule_id",
        parameters={"user": user_id, "all": GLOBAL_USER}).result_rows
    deleted = {str(rule_id) for (rule_id,) in client.query(
        f"SELECT DISTINCT rule_id FROM {database}.alert_rules "
        "WHERE user_id = {all:String} AND is_deleted = 1",
        parameters={"all": GLOBAL_USER}).result_rows}
    own: dict[str, AlertRule] = {}
    updated_ms: dict[str, int] = {}
    templates = {rule.rule_id: rule for rule in default_rules()}
    stored_templates = {str(row[0]) for row in rows if str(row[1]) == GLOBAL_USER}
    for row in rows:
        try:
            rule = _rule(row)
        except ValueError:  # a metric or op this build does not know: not evaluated either
            logger.warning("alert_rules row %r is not a rule this API knows", row[0])
            continue
        if rule.user_id == GLOBAL_USER:
            templates[rule.rule_id] = rule
        else:
            own[rule.rule_id] = rule
            updated_ms[rule.rule_id] = int(row[-1])
    for rule_id in deleted - stored_templates:
        templates.pop(rule_id, None)
    return UserRules(user_id, own, tuple(templates.values()), updated_ms)


def last_version(client: Client, database: str, user_id: str, rule_id: str) -> int:
    """The highest version ever stored for the rule, deleted ones included (0: none)."""
    rows = client.query(
        f"SELECT max(version) FROM {database}.alert_rules "
        "WHERE user_id = {user:String} AND rule_id = {rule:String}",
        parameters={"user": user_id, "rule": rule_id}).result_rows
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


# --- writing ----------------------------------------------------------------------------

_STRIPES = tuple(threading.Lock() for _ in range(64))


def lock_for(user_id: str) -> threading.Lock:
    """The lock serialising one user's rule changes in this process (read, check, write)."""
    return _STRIPES[zlib.crc32(user_id.encode()) % len(_STRIPES)]


def publish(producer: EventProducer, settings: Settings, rule_id: str,
            rule: AlertRule | None) -> None:
    """`rule` (None: a tombstone) onto `alert.rules`, key `rule_id`; returns once Kafka
    confirmed it, else 503 with Retry-After (nothing was changed)."""
    value = None if rule is None else msgspec.json.encode(rule)
    failure = producer.send([(rule_id.encode(), value)], topic=settings.topic(ALERT_RULES))
    if failure is not None:
        logger.warning("alert rule %s not published: %s", rule_id, failure)
        raise APIError(503, "unavailable", "Kafka did not confirm the rule change; retry",
                       headers=retry_after(settings.ingest_timeout_seconds))


def store(client: Client, database: str, rule: AlertRule, *, deleted: bool,
          updated_ms: int) -> None:
    """The rule's `alert_rules` row, written at once so that a read shows the change; the
    pipeline writes the same row from the topic (same version: one is kept)."""
    row = rule_row(rule, deleted=deleted, updated_ms=updated_ms)
    try:
        insert(client, ALERT_RULES_OUTPUT, database, msgspec.json.encode(row) + b"\n")
    except Exception:  # clickhouse-connect and chDB raise unrelated types
        # Published already: the pipeline stores it from the topic in a moment.
        logger.exception("alert_rules row of %s version %s not written", rule.rule_id,
                         rule.version)

"""The alert rules in force: defaults for every user, each user's own rules, live updates.

Rules arrive on the compacted topic `alert.rules` (key `rule_id`, value an `AlertRule`
as JSON, a null value deletes). `RuleBook` applies them and answers `rules_for(user,
service)` with one dict lookup per call (cached tuples, rebuilt only for a user whose
rules changed). The cache is bounded: two generations, the older dropped by `age_cache()`
(the alerting hook calls it once per minute of event time) or when the newer one holds
`max_cached_keys` keys; a key looked up again moves to the newer one.

Defaults ("global" rules, `user_id` "*"). The book starts with three templates:

    default:*:error_rate        error_rate > 0.05        for_windows 2
    default:*:latency_p95_ms    latency_p95_ms > 2000    for_windows 2
    default:*:requests_anomaly  requests_anomaly > 4 (z-score)

A template applies to every user as the rule `default:{user_id}:{name}` (the `*` segment
replaced by the user id, so ids stay deterministic). An admin may replace a template by
publishing a rule with `user_id` "*" and the template's id and a higher version, or add
new templates (`<prefix>:*:<name>`; an id without `:*:` gets `:{user_id}` appended).

Override. A user's own rule takes a template's place when either
  * its `rule_id` is the template's per-user id (`default:alice:error_rate`): the way the
    dashboard edits or switches off (enabled=False) a default for one user; deleting that
    rule (tombstone) brings the default back; or
  * it has the template's metric and no service filter: a user who writes their own
    unfiltered error-rate rule expects it to replace the default, not to get both.
Both count whether the user's rule is enabled or not. A service-filtered user rule
(`service: stripe`) does not remove the default for other services.

Versions. An update whose `version` is lower than the one already applied for that
`rule_id` is ignored (two API replicas racing); equal versions apply (idempotent
replays). A tombstone deletes whatever version is there and remembers it, so a stale
upsert of that version or older cannot resurrect the rule; recreate with a higher version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from core.errors import KeypulseError
from schemas.alerts import (
    GLOBAL_USER,
    AlertRule,
    default_rules,
    effective_rules,
)

logger = logging.getLogger(__name__)


class InvalidRuleMessage(KeypulseError):
    """An `alert.rules` message that is not a rule: divert it, do not crash the flow."""


class RuleChange(NamedTuple):
    """One decoded `alert.rules` message: `rule` None is a delete (tombstone)."""

    rule_id: str
    rule: AlertRule | None


def decode_rule_message(key: bytes | str | None, value: bytes | None) -> RuleChange:
    """Decode one `alert.rules` message; raises `InvalidRuleMessage` (send it to a DLQ)."""
    rule_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    if value is None:
        if not rule_id:
            msg = "alert.rules tombstone without a key"
            raise InvalidRuleMessage(msg)
        return RuleChange(rule_id, None)
    try:
        rule = msgspec.json.decode(value, type=AlertRule)
    except msgspec.DecodeError as exc:
        msg = f"alert.rules {rule_id!r}: {exc}"
        raise InvalidRuleMessage(msg) from exc
    if rule_id and rule_id != rule.rule_id:
        msg = f"alert.rules key {rule_id!r} differs from rule_id {rule.rule_id!r}"
        raise InvalidRuleMessage(msg)
    return RuleChange(rule.rule_id, rule)


MAX_CACHED_KEYS = 100_000
"""(user, service) lookups one `RuleBook` caches per generation (two generations at most)."""

Cache = dict[str, dict[str, tuple[AlertRule, ...]]]  # user → service → rules


class RuleBook:
    """All rules known to this worker, with an O(1) `rules_for(user_id, service)`.

    Pickles as `(rules by user, versions)`; the lookup cache is rebuilt lazily.
    """

    __slots__ = ("_by_user", "_cache", "_cached", "_older", "_owner", "_versions",
                 "max_cached_keys")

    def __init__(self, templates: Iterable[AlertRule] | None = None, *,
                 max_cached_keys: int = MAX_CACHED_KEYS) -> None:
        self._by_user: dict[str, dict[str, AlertRule]] = {}
        self._owner: dict[str, str] = {}
        self._versions: dict[str, tuple[int, bool]] = {}  # rule_id → (version, deleted)
        self.max_cached_keys = max_cached_keys
        self._cache: Cache = {}
        self._older: Cache = {}
        self._cached = 0  # keys in _cache
        for rule in default_rules() if templates is None else templates:
            self.upsert(rule)

    # -- updates -------------------------------------------------------------------------

    def apply(self, change: RuleChange) -> bool:
        """Apply one decoded message; False when it was stale and ignored."""
        if change.rule is None:
            return self.delete(change.rule_id)
        return self.upsert(change.rule)

    def apply_message(self, key: bytes | str | None, value: bytes | None) -> bool:
        """`decode_rule_message` then `apply`; raises `InvalidRuleMessage`."""
        return self.apply(decode_rule_message(key, value))

    def upsert(self, rule: AlertRule) -> bool:
        known = self._versions.get(rule.rule_id)
        if known is not None:
            version, deleted = known
            if rule.version < version or (deleted and rule.version == version):
                logger.info(
                    "ignoring stale rule %s version %s (have %s%s)", rule.rule_id,
                    rule.version, version, ", deleted" if deleted else "",
                )
                return False
        previous_owner = self._owner.get(rule.rule_id)
        if previous_owner is not None and previous_owner != rule.user_id:
            self._drop(rule.rule_id, previous_owner)
        self._by_user.setdefault(rule.user_id, {})[rule.rule_id] = rule
        self._owner[rule.rule_id] = rule.user_id
        self._versions[rule.rule_id] = (rule.version, False)
        self._invalidate(rule.user_id)
        return True

    def delete(self, rule_id: str) -> bool:
        owner = self._owner.pop(rule_id, None)
        if owner is None:
            return False
        self._drop(rule_id, owner)
        version = self._versions.get(rule_id, (0, False))[0]
        self._versions[rule_id] = (version, True)
        self._invalidate(owner)
        return True

    def _drop(self, rule_id: str, owner: str) -> None:
        rules = self._by_user.get(owner)
        if rules is not None:
            rules.pop(rule_id, None)
            if not rules:
                del self._by_user[owner]
        self._invalidate(owner)

    def _invalidate(self, user_id: str) -> None:
        if user_id == GLOBAL_USER:
            self._cache, self._older, self._cached = {}, {}, 0
        else:
            self._cached -= len(self._cache.pop(user_id, ()))
            self._older.pop(user_id, None)

    def age_cache(self) -> None:
        """Drop the lookups not used since the previous call (O(1): a generation swap)."""
        self._older, self._cache, self._cached = self._cache, {}, 0

    def cached_keys(self) -> int:
        return sum(len(by_service) for cache in (self._cache, self._older)
                   for by_service in cache.values())

    # -- queries -------------------------------------------------------------------------

    def rules_for(self, user_id: str, service: str) -> tuple[AlertRule, ...]:
        """The enabled rules that apply to one key: the user's own, then the defaults."""
        by_service = self._cache.get(user_id)
        if by_service is None:
            by_service = self._older.pop(user_id, None)
            if by_service is None:
                by_service = {}
            else:
                self._cached += len(by_service)
            self._cache[user_id] = by_service
        rules = by_service.get(service)
        if rules is None:
            rules = by_service[service] = tuple(
                rule for rule in self._effective(user_id)
                if rule.enabled and (rule.service is None or rule.service == service)
            )
            self._cached += 1
            if self._cached >= self.max_cached_keys:
                self.age_cache()
        return rules

    def _effective(self, user_id: str) -> list[AlertRule]:
        """schemas.alerts.effective_rules: the API lists the same (GET /v1/alert-rules)."""
        return effective_rules(user_id, self._by_user.get(user_id, {}),
                               self._by_user.get(GLOBAL_USER, {}).values())

    def get(self, rule_id: str) -> AlertRule | None:
        owner = self._owner.get(rule_id)
        return None if owner is None else self._by_user[owner].get(rule_id)

    def owner_of(self, rule_id: str) -> str | None:
        """Whose rule this is: lets a router send a tombstone (no value) to the right key."""
        return self._owner.get(rule_id)

    def own_rules(self, user_id: str) -> tuple[AlertRule, ...]:
        """The rules stored for `user_id` ("*" for the templates), disabled ones included."""
        return tuple(self._by_user.get(user_id, {}).values())

    def __len__(self) -> int:
        return len(self._owner)

    # -- snapshots -----------------------------------------------------------------------

    def __getstate__(self) -> tuple[dict[str, dict[str, AlertRule]], dict[str, tuple[int, bool]]]:
        return self._by_user, self._versions

    def __setstate__(self, state: Any) -> None:
        self._by_user, self._versions = state
        self._owner = {rid: user for user, rules in self._by_user.items() for rid in rules}
        self.max_cached_keys = MAX_CACHED_KEYS
        self._cache, self._older, self._cached = {}, {}, 0

"""Threshold and anomaly rules evaluated at every closed window: the alert state machine.

Per (rule_id, user_id, service) the evaluator walks

    ok ──breach──▶ pending(n) ──n = for_windows──▶ FIRING ──resolve_windows clean──▶ ok
                      │ clean                         │ idle / rule withdrawn
                      ▼                               ▼
                      ok                           RESOLVED

and emits an `Alert` only on the two transitions marked in capitals: one `firing` and one
`resolved` per episode, sharing `alert_id = sha1(rule_id, user_id, service, start of the
window that fired)`. The id depends only on the windows seen, so a replay from a snapshot
produces the same ids and the idempotent sinks store each episode once.

Decisions (docs/alerts.md explains them for users):
* A window with fewer than `min_requests` requests is *no data*: it neither breaches nor
  counts as clean, and does not break a streak. (For `requests_anomaly` the request count
  is itself the measurement, so a quiet window after warm-up is a clean observation.)
* Idle: a key that has had no window with data for `idle_resolve_windows` windows of
  event time resolves if firing (`resolved_at` = last data window end + idle time, so it is
  deterministic however late `on_idle` is called) and forgets a pending streak.
* Rule changes apply from the next window: `on_window` uses the rules it is given. A new
  threshold or for/resolve count applies to the running streak; a changed metric or op
  ends it (resolving if firing). A rule that is gone from the list (deleted, disabled, or
  its service filter no longer matches) resolves at the next window of the key, or at idle.
* Only keys with a running streak or a firing alert hold state: steady, healthy traffic
  costs two dict lookups and one comparison per rule and window, with no allocation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.clock import from_ms, to_ms
from pipeline.alerting import messages
from pipeline.alerting.anomaly import AnomalyConfig, AnomalyDetector, AnomalyScore
from pipeline.alerting.metrics import COMPARE, EXTRACTORS
from schemas.alerts import Alert, AlertRule, AlertState, Metric
from schemas.stats import StatsRecord

logger = logging.getLogger(__name__)

Key = tuple[str, str]
"""(user_id, service)"""

_ANOMALY = Metric.REQUESTS_ANOMALY


@dataclass(frozen=True, slots=True)
class EvaluatorConfig:
    idle_resolve_windows: int = 5
    """A firing key with no data for this many windows (of its own length) resolves."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)


def alert_id(rule_id: str, user_id: str, service: str, window_start_ms: int) -> str:
    """Deterministic id of the episode that fired at the window starting `window_start_ms`."""
    raw = f"{rule_id}\x1f{user_id}\x1f{service}\x1f{window_start_ms}".encode()
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:32]


class _RuleState:
    """One rule on one key while it breaches or fires; pickles as a flat tuple."""

    __slots__ = (
        "alert_id", "breaches", "cleans", "fired_at_ms", "last_end_ms", "last_start_ms",
        "last_value", "rule", "streak_start_ms",
    )

    def __init__(self, rule: AlertRule) -> None:
        self.rule = rule
        self.alert_id: str | None = None
        self.breaches = 0
        self.cleans = 0
        self.streak_start_ms = 0
        self.fired_at_ms = 0
        self.last_start_ms = 0
        self.last_end_ms = 0
        self.last_value = 0.0

    def idle_ms(self, windows: int) -> int:
        return windows * (self.last_end_ms - self.last_start_ms)

    def __getstate__(self) -> tuple[Any, ...]:  # snapshots pickle every state each epoch
        return (self.alert_id, self.breaches, self.cleans, self.fired_at_ms, self.last_end_ms,
                self.last_start_ms, self.last_value, self.rule, self.streak_start_ms)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.alert_id, self.breaches, self.cleans, self.fired_at_ms, self.last_end_ms,
         self.last_start_ms, self.last_value, self.rule, self.streak_start_ms) = state


class AlertEvaluator:
    """Alert state for any number of (user_id, service) keys.

    Call `on_window(stats, rules)` once per closed window of a key, and `on_idle(now_ms)`
    from time to time with the event-time watermark. Picklable (Bytewax snapshots it).
    """

    __slots__ = ("_anomaly", "_keys", "config")

    def __init__(self, config: EvaluatorConfig | None = None) -> None:
        self.config = config or EvaluatorConfig()
        self._keys: dict[Key, dict[str, _RuleState]] = {}
        self._anomaly = AnomalyDetector(self.config.anomaly)

    # -- evaluation ----------------------------------------------------------------------

    def on_window(self, stats: StatsRecord, rules: Sequence[AlertRule]) -> list[Alert]:
        """Evaluate `rules` (those of the key; others are skipped) on one closed window."""
        out: list[Alert] = []
        key = (stats.user_id, stats.service)
        states = self._keys.get(key)
        if not rules and not states:
            return out
        ws, we = to_ms(stats.window_start), to_ms(stats.window_end)
        idle_windows = self.config.idle_resolve_windows
        score: AnomalyScore | None = None
        scored = False
        seen: set[str] | None = set() if states else None
        for rule in rules:
            if not rule.enabled or (rule.service is not None and rule.service != stats.service):
                continue
            rid = rule.rule_id
            breach = False
            if seen is not None:
                seen.add(rid)
            st = states.get(rid) if states else None
            if st is not None:
                if ws < st.last_end_ms:
                    continue  # a window already seen (replay): nothing changes twice
                if st.rule.metric != rule.metric or st.rule.op != rule.op:
                    self._end(out, key, rid, st, reason="changed", ws=ws, we=we)
                    st = None
            if rule.metric == _ANOMALY:
                if not scored:
                    score = self._anomaly.observe(key, stats.requests, ws, we - ws)
                    scored = True
                if score is None:
                    value: float | None = None
                else:
                    value = score.z
                    breach = (
                        COMPARE[rule.op](score.z, rule.threshold)
                        and abs(score.delta) >= self.config.anomaly.min_delta
                        and max(stats.requests, score.expected) >= rule.min_requests
                    )
            elif stats.requests < rule.min_requests:
                value = None
            else:
                value = float(EXTRACTORS[rule.metric](stats))
                breach = COMPARE[rule.op](value, rule.threshold)
            if value is None:  # no data: only the passing of time matters
                if st is not None and we - st.last_end_ms >= st.idle_ms(idle_windows):
                    self._expire(out, key, rid, st)
                continue
            if st is not None and ws - st.last_end_ms >= st.idle_ms(idle_windows):
                self._expire(out, key, rid, st)
                st = None
            if st is None:
                if not breach:
                    continue
                st = _RuleState(rule)
                if states is None:
                    states = self._keys[key] = {}
                states[rid] = st
            st.rule = rule
            st.last_start_ms, st.last_end_ms, st.last_value = ws, we, value
            if st.alert_id is None:
                if not breach:
                    del self._keys[key][rid]
                    continue
                if st.breaches == 0:
                    st.streak_start_ms = ws
                st.breaches += 1
                if st.breaches >= rule.for_windows:
                    st.alert_id = alert_id(rid, key[0], key[1], ws)
                    st.fired_at_ms = we
                    st.cleans = 0
                    text = self._text(rule, key, stats, score, st.breaches, firing=True)
                    out.append(self._alert(st, key, AlertState.FIRING, start_ms=st.streak_start_ms,
                                           end_ms=we, resolved_ms=None, message=text))
            elif breach:
                st.cleans = 0
            else:
                if st.cleans == 0:
                    st.streak_start_ms = ws
                st.cleans += 1
                if st.cleans >= rule.resolve_windows:
                    text = self._text(rule, key, stats, score, st.cleans, firing=False)
                    out.append(self._alert(
                        st, key, AlertState.RESOLVED, start_ms=st.streak_start_ms, end_ms=we,
                        resolved_ms=we, message=text,
                    ))
                    del self._keys[key][rid]
        if seen is not None and states:
            for rid in [rid for rid in states if rid not in seen]:
                self._end(out, key, rid, states[rid], reason="deleted or disabled",
                          ws=ws, we=we)
        if states is not None and not states:
            self._keys.pop(key, None)
        return out

    def on_idle(self, now_ms: int) -> list[Alert]:
        """Resolve firing keys with no data for the idle time before `now_ms` (event time).

        Contract: every window ending at or before `now_ms` has already been passed to
        `on_window` (call it with the watermark after evaluating the windows it closed).
        Cost is proportional to the keys that hold state (breaching or firing ones only).
        """
        out: list[Alert] = []
        windows = self.config.idle_resolve_windows
        for key in list(self._keys):
            states = self._keys[key]
            for rid in [rid for rid, st in states.items()
                        if now_ms - st.last_end_ms >= st.idle_ms(windows)]:
                self._expire(out, key, rid, states[rid])
            if not states:
                del self._keys[key]
        return out

    def prune(self, before_ms: int) -> int:
        """Forget keys idle since before `before_ms` (event time): their anomaly baselines
        and pending streaks. A firing key is left to `on_idle`, which resolves it; returns
        how many baselines and streaks went."""
        dropped = self._anomaly.prune(before_ms)
        for key in list(self._keys):
            states = self._keys[key]
            stale = [rid for rid, st in states.items()
                     if st.alert_id is None and st.last_end_ms < before_ms]
            for rid in stale:
                del states[rid]
            dropped += len(stale)
            if not states:
                del self._keys[key]
        return dropped

    def next_deadline_ms(self) -> int | None:
        """Event time at which `on_idle` would next resolve something (None: nothing fires)."""
        windows = self.config.idle_resolve_windows
        deadlines = [
            st.last_end_ms + st.idle_ms(windows)
            for states in self._keys.values() for st in states.values()
            if st.alert_id is not None
        ]
        return min(deadlines, default=None)

    # -- transitions ---------------------------------------------------------------------

    def _expire(self, out: list[Alert], key: Key, rid: str, st: _RuleState) -> None:
        """Idle: resolve if firing, forget a pending streak."""
        del self._keys[key][rid]
        if st.alert_id is None:
            return
        idle_ms = st.idle_ms(self.config.idle_resolve_windows)
        text = messages.idle(st.rule, key[1], last_end_ms=st.last_end_ms,
                             idle_seconds=idle_ms // 1000)
        out.append(self._alert(st, key, AlertState.RESOLVED, start_ms=st.last_start_ms,
                               end_ms=st.last_end_ms, resolved_ms=st.last_end_ms + idle_ms,
                               message=text))

    def _end(self, out: list[Alert], key: Key, rid: str, st: _RuleState, *, reason: str,
             ws: int, we: int) -> None:
        """The rule went away or changed meaning: close the episode at this window."""
        del self._keys[key][rid]
        if st.alert_id is not None:
            text = messages.withdrawn(st.rule, key[1], reason=reason)
            out.append(self._alert(st, key, AlertState.RESOLVED, start_ms=ws, end_ms=we,
                                   resolved_ms=we, message=text))

    @staticmethod
    def _alert(st: _RuleState, key: Key, state: AlertState, *, start_ms: int, end_ms: int,
               resolved_ms: int | None, message: str) -> Alert:
        rule = st.rule
        return Alert(
            alert_id=st.alert_id or "", rule_id=rule.rule_id, rule_name=rule.name, user_id=key[0],
            service=key[1], metric=rule.metric, op=rule.op, threshold=rule.threshold,
            value=st.last_value, severity=rule.severity, state=state,
            window_start=from_ms(start_ms), window_end=from_ms(end_ms),
            fired_at=from_ms(st.fired_at_ms),
            resolved_at=None if resolved_ms is None else from_ms(resolved_ms),
            message=message,
        )

    @staticmethod
    def _text(rule: AlertRule, key: Key, stats: StatsRecord, score: AnomalyScore | None,
              windows: int, *, firing: bool) -> str:
        end_ms = to_ms(stats.window_end)
        if score is not None and rule.metric == _ANOMALY:
            return messages.anomaly(
                rule, key[1], z=score.z, requests=stats.requests, expected=score.expected,
                std=score.std, window_seconds=stats.window_seconds, windows=windows,
                end_ms=end_ms, firing=firing,
            )
        describe = messages.breach if firing else messages.recovery
        return describe(
            rule, key[1], EXTRACTORS[rule.metric](stats), window_seconds=stats.window_seconds,
            windows=windows, end_ms=end_ms, requests=stats.requests,
        )

    # -- queries -------------------------------------------------------------------------

    def firing_rules(self, user_id: str, service: str) -> list[AlertRule]:
        """The rules currently firing on one key."""
        states = self._keys.get((user_id, service))
        if not states:
            return []
        return [st.rule for st in states.values() if st.alert_id is not None]

    def is_firing(self, user_id: str, service: str, metrics: Collection[str] = ()) -> bool:
        """Whether any rule (or any rule on one of `metrics`) fires on the key."""
        return any(not metrics or rule.metric in metrics
                   for rule in self.firing_rules(user_id, service))

    def state_count(self) -> int:
        """Rule states held (breaching or firing rules on some key)."""
        return sum(len(states) for states in self._keys.values())

    def firing_count(self) -> int:
        return sum(st.alert_id is not None
                   for states in self._keys.values() for st in states.values())

    @property
    def anomaly(self) -> AnomalyDetector:
        return self._anomaly

    # -- snapshots -----------------------------------------------------------------------

    def __getstate__(self) -> tuple[Any, ...]:
        return self.config, self._keys, self._anomaly

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.config, self._keys, self._anomaly = state

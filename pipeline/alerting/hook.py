"""`AlertingHook`: the alerting core behind the partition processor's `WindowHook`.

    hook = AlertingHook(resumed_state)            # a HookFactory: state or None → hook
    hook.on_control(item)                         # each alert.rules item (broadcast)
    alerts, notes = hook.on_windows(stats, wm)    # each batch of closed windows
    signals = hook.take_signals()                 # stage 1 of provider incidents
    state = hook.snapshot()                       # plain picklable data

Each partition's hook holds the whole rule book (rules are broadcast) and the alert
state of that partition's users. `on_windows` evaluates every closed window, then calls
`on_idle(watermark)`: every window ending at or before the watermark has been passed in
by then, which is what makes idle resolution deterministic.

State per (user, service) is bounded: once per minute of event time (`PRUNE_EVERY_MS` of
the watermark, so a replay prunes at the same points) the hook forgets the anomaly
baselines, pending streaks and traffic history of keys idle for `state_idle_seconds`, and
ages the rule book's lookup cache. Forgetting is invisible in the alerts as long as
`state_idle_seconds` exceeds the anomaly detector's `reset_after_windows` (it restarts a
baseline idle that long anyway) and the idle-resolve time (firing keys resolve first).
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable
from typing import Any

from core.clock import to_ms
from core.templates import Templates
from pipeline.alerting.evaluator import AlertEvaluator, EvaluatorConfig
from pipeline.alerting.incidents import (
    IncidentConfig,
    IncidentInput,
    PopulationChange,
    TrafficHistory,
    incident_signal,
)
from pipeline.alerting.notify import notification_for
from pipeline.alerting.rules import InvalidRuleMessage, RuleBook, RuleChange, decode_rule_message
from schemas.alerts import Alert, AlertRule
from schemas.notifications import Notification
from schemas.stats import StatsRecord

logger = logging.getLogger(__name__)

STATE_VERSION = 2
"""1: (version, book, evaluator); 2: + the traffic history of provider incidents."""

PRUNE_EVERY_MS = 60_000
"""Idle state is looked for once per this much event time (a walk over every key)."""

DEFAULT_STATE_IDLE_SECONDS = 3600


def upgrade(state: tuple[Any, ...], incidents: IncidentConfig) -> tuple[Any, ...]:
    """A snapshot of any earlier version as the current one."""
    version = state[0]
    if version == 1:
        empty = TrafficHistory(incidents.history_windows, incidents.history_min_requests)
        state = (2, *state[1:], empty)
        version = 2
    if version != STATE_VERSION:
        msg = f"alerting state version {version}, expected {STATE_VERSION}"
        raise ValueError(msg)
    return state


class AlertingHook:
    """Rules + evaluator for one partition; `snapshot()` / `AlertingHook(state)` round-trip."""

    __slots__ = ("_book_blob", "book", "evaluator", "history", "idle_checked_s",
                 "invalid_rules", "pruned_at", "signals", "state_idle_ms", "templates")

    def __init__(self, state: Any = None, *, config: EvaluatorConfig | None = None,
                 incidents: IncidentConfig | None = None,
                 state_idle_seconds: int = DEFAULT_STATE_IDLE_SECONDS,
                 templates: Templates | None = None) -> None:
        incidents = incidents or IncidentConfig()
        if state is None:
            self.book = RuleBook()
            self.evaluator = AlertEvaluator(config)
            self.history = TrafficHistory(incidents.history_windows,
                                          incidents.history_min_requests)
        else:
            _version, book, self.evaluator, self.history = upgrade(state, incidents)
            self.book = pickle.loads(book) if isinstance(book, bytes) else book
        # Every partition holds the whole rule book; it changes rarely, so a snapshot
        # re-pickles it only after a change.
        self._book_blob: bytes | None = None
        self.signals: list[IncidentInput] = []
        self.invalid_rules = 0
        self.idle_checked_s = -1
        self.pruned_at = -1
        self.state_idle_ms = state_idle_seconds * 1000
        self.templates = templates  # None: the packaged registry

    @classmethod
    def factory(cls, state_idle_seconds: int = DEFAULT_STATE_IDLE_SECONDS,
                incidents: IncidentConfig | None = None, templates: Templates | None = None
                ) -> Callable[[Any], AlertingHook]:
        """A `HookFactory` (resumed state → hook) with these settings."""
        return functools.partial(cls, state_idle_seconds=state_idle_seconds,
                                 incidents=incidents, templates=templates)

    def on_control(self, item: Any) -> None:
        """An `alert.rules` item: a `RuleChange`, an `AlertRule`, or raw `(key, value)`."""
        if isinstance(item, RuleChange):
            change = item
        elif isinstance(item, AlertRule):
            change = RuleChange(item.rule_id, item)
        elif isinstance(item, tuple) and len(item) == 2:
            try:
                change = decode_rule_message(item[0], item[1])
            except InvalidRuleMessage as exc:
                self.invalid_rules += 1
                logger.warning("ignoring invalid alert rule: %s", exc)
                return
        else:
            logger.debug("alerting hook: ignoring control item %r", type(item))
            return
        self.book.apply(change)
        self._book_blob = None

    def on_windows(self, stats: list[StatsRecord], watermark_ms: int
                   ) -> tuple[list[Alert], list[Notification]]:
        evaluator, book, history, signals = self.evaluator, self.book, self.history, self.signals
        alerts: list[Alert] = []
        for record in stats:
            alerts += evaluator.on_window(record, book.rules_for(record.user_id, record.service))
            signal = incident_signal(evaluator, record)
            key = (record.user_id, record.service)
            if history.observe(key, to_ms(record.window_start), record.requests,
                               signal is not None):
                signals.append(PopulationChange(record.service, 1))
            elif signal is not None and history.trusted(key):
                signals.append(signal)
        # on_idle walks every key with state: once per second of event time is enough (its
        # results depend on the watermark only, not on when it is called).
        if watermark_ms // 1000 != self.idle_checked_s:
            self.idle_checked_s = watermark_ms // 1000
            alerts += evaluator.on_idle(watermark_ms)
        if watermark_ms // PRUNE_EVERY_MS != self.pruned_at:
            self.pruned_at = watermark_ms // PRUNE_EVERY_MS
            self.prune(watermark_ms)
        return alerts, [notification_for(alert, self.templates) for alert in alerts]

    def prune(self, watermark_ms: int) -> int:
        """Forget the state of keys idle for `state_idle_seconds` before `watermark_ms`;
        trusted keys among them leave their service's population. Returns keys dropped."""
        before_ms = watermark_ms - self.state_idle_ms
        dropped = self.evaluator.prune(before_ms)
        trusted = self.history.prune(before_ms)
        self.signals += [PopulationChange(service, -1) for _user, service in trusted]
        self.book.age_cache()
        if dropped or trusted:
            logger.debug("alerting state: %s idle keys pruned (%s trusted)", dropped,
                         len(trusted))
        return dropped

    def take_signals(self) -> list[IncidentInput]:
        """Stage-1 incident items since the last call; route them by service to stage 2."""
        signals, self.signals = self.signals, []
        return signals

    def state_sizes(self) -> dict[str, int]:
        """How many entries each per-key structure holds (tests, diagnostics)."""
        return {
            "baselines": len(self.evaluator.anomaly),
            "rule_states": self.evaluator.state_count(),
            "history": len(self.history),
            "cached_rules": self.book.cached_keys(),
        }

    def snapshot(self) -> tuple[int, bytes, AlertEvaluator, TrafficHistory]:
        if self._book_blob is None:
            self._book_blob = pickle.dumps(self.book, protocol=5)
        return STATE_VERSION, self._book_blob, self.evaluator, self.history

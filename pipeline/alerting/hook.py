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
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from pipeline.alerting.evaluator import AlertEvaluator, EvaluatorConfig
from pipeline.alerting.incidents import IncidentSignal, incident_signal
from pipeline.alerting.notify import notification_for
from pipeline.alerting.rules import InvalidRuleMessage, RuleBook, RuleChange, decode_rule_message
from schemas.alerts import Alert, AlertRule
from schemas.notifications import Notification
from schemas.stats import StatsRecord

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class AlertingHook:
    """Rules + evaluator for one partition; `snapshot()` / `AlertingHook(state)` round-trip."""

    __slots__ = ("_book_blob", "book", "evaluator", "idle_checked_s", "invalid_rules", "signals")

    def __init__(self, state: Any = None, *, config: EvaluatorConfig | None = None) -> None:
        if state is None:
            self.book = RuleBook()
            self.evaluator = AlertEvaluator(config)
        else:
            version, book, self.evaluator = state
            if version != STATE_VERSION:
                msg = f"alerting state version {version}, expected {STATE_VERSION}"
                raise ValueError(msg)
            self.book = pickle.loads(book) if isinstance(book, bytes) else book
        # Every partition holds the whole rule book; it changes rarely, so a snapshot
        # re-pickles it only after a change.
        self._book_blob: bytes | None = None
        self.signals: list[IncidentSignal] = []
        self.invalid_rules = 0
        self.idle_checked_s = -1

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
        evaluator, book = self.evaluator, self.book
        alerts: list[Alert] = []
        for record in stats:
            alerts += evaluator.on_window(record, book.rules_for(record.user_id, record.service))
            signal = incident_signal(evaluator, record)
            if signal is not None:
                self.signals.append(signal)
        # on_idle walks every key with state: once per second of event time is enough (its
        # results depend on the watermark only, not on when it is called).
        if watermark_ms // 1000 != self.idle_checked_s:
            self.idle_checked_s = watermark_ms // 1000
            alerts += evaluator.on_idle(watermark_ms)
        return alerts, [notification_for(alert) for alert in alerts]

    def take_signals(self) -> list[IncidentSignal]:
        """Stage-1 incident signals since the last call; route them by service to stage 2."""
        signals, self.signals = self.signals, []
        return signals

    def snapshot(self) -> tuple[int, bytes, AlertEvaluator]:
        if self._book_blob is None:
            self._book_blob = pickle.dumps(self.book, protocol=5)
        return STATE_VERSION, self._book_blob, self.evaluator

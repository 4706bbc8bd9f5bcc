"""AlertingHook: what the partition processor sees."""

from __future__ import annotations

import pickle

import msgspec

from pipeline.alerting import RuleChange
from pipeline.alerting.hook import AlertingHook
from pipeline.alerting.testing import T0_MS, make_stats
from schemas.alerts import AlertRule, AlertState, Metric, Op

W = 10_000


def test_rules_windows_idle_and_snapshot() -> None:
    hook = AlertingHook()
    rule = AlertRule(rule_id="default:u1:error_rate", user_id="u1", name="5xx",
                     metric=Metric.SERVER_ERROR_RATE, op=Op.GT, threshold=0.1, version=1)
    hook.on_control((b"default:u1:error_rate", msgspec.json.encode(rule)))
    hook.on_control((b"bad", b"{"))
    assert hook.invalid_rules == 1
    stats = [make_stats(window=0, user_id="u1", requests=100, server_errors=40),
             make_stats(window=0, user_id="u2", requests=100, server_errors=40)]
    alerts, notes = hook.on_windows(stats, T0_MS + W)
    # u1: own 5xx rule fires at once; u2: default error_rate needs 2 windows
    assert [(a.user_id, a.rule_id, a.state) for a in alerts] == [
        ("u1", "default:u1:error_rate", AlertState.FIRING)]
    assert [n.template for n in notes] == ["alert_firing"]
    assert [s.user_id for s in hook.take_signals()] == ["u1"]
    assert hook.take_signals() == []

    restored = AlertingHook(pickle.loads(pickle.dumps(hook.snapshot())))
    for h in (hook, restored):
        alerts, notes = h.on_windows([], T0_MS + 10 * W)  # u1 went idle
        assert [a.state for a in alerts] == [AlertState.RESOLVED]
        assert notes[0].notification_id == f"alert:{alerts[0].alert_id}:resolved"

    hook.on_control(RuleChange("default:u1:error_rate", None))  # back to the default
    assert "default:u1:error_rate" in [r.rule_id for r in hook.book.rules_for("u1", "openai")]
    assert hook.book.get("default:u1:error_rate") is None

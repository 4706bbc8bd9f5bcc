"""AlertingHook: what the partition processor sees."""

from __future__ import annotations

import pickle

import msgspec

from pipeline.alerting import AlertEvaluator, RuleChange
from pipeline.alerting.hook import PRUNE_EVERY_MS, AlertingHook
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
    assert hook.take_signals() == []  # u1 has no traffic history: no incident signal

    restored = AlertingHook(pickle.loads(pickle.dumps(hook.snapshot())))
    for h in (hook, restored):
        alerts, notes = h.on_windows([], T0_MS + 10 * W)  # u1 went idle
        assert [a.state for a in alerts] == [AlertState.RESOLVED]
        assert notes[0].notification_id == f"alert:{alerts[0].alert_id}:resolved"

    hook.on_control(RuleChange("default:u1:error_rate", None))  # back to the default
    assert "default:u1:error_rate" in [r.rule_id for r in hook.book.rules_for("u1", "openai")]
    assert hook.book.get("default:u1:error_rate") is None


def test_idle_keys_are_pruned_on_event_time_and_the_snapshot_shrinks() -> None:
    hook = AlertingHook(state_idle_seconds=600)
    empty = len(pickle.dumps(hook.snapshot()))
    stats = [make_stats(window=0, user_id=f"u{i}", service=f"s{i % 7}", requests=20)
             for i in range(2000)]
    hook.on_windows(stats, T0_MS + W)
    full = hook.state_sizes()
    assert full == {"baselines": 2000, "rule_states": 0, "history": 2000,
                    "cached_rules": 2000}
    assert len(pickle.dumps(hook.snapshot())) > empty + 2000 * 30
    # a busy key keeps its state; the others go once idle for 600 s of event time
    for w in range(1, 80):
        busy = [make_stats(window=w, user_id="u1", service="s1", requests=20)]
        hook.on_windows(busy, T0_MS + (w + 1) * W)
    assert hook.state_sizes() == {"baselines": 1, "rule_states": 0, "history": 1,
                                  "cached_rules": 1}
    assert len(pickle.dumps(hook.snapshot())) < empty + 500
    # pruning happens at most once per minute of event time, at the same points in a replay
    assert hook.pruned_at == (T0_MS + 80 * W) // PRUNE_EVERY_MS


def test_rule_cache_is_bounded_by_generations() -> None:
    hook = AlertingHook()
    hook.book.max_cached_keys = 100
    for i in range(1000):
        assert len(hook.book.rules_for(f"u{i}", "openai")) == 3
        assert hook.book.cached_keys() <= 200
    hook.book.age_cache()
    hook.book.age_cache()
    assert hook.book.cached_keys() == 0


def test_a_version_1_snapshot_resumes_without_history() -> None:
    evaluator = AlertEvaluator()
    book = AlertingHook().book
    hook = AlertingHook((1, pickle.dumps(book), evaluator))
    assert hook.evaluator is evaluator
    assert len(hook.history) == 0
    assert hook.snapshot()[0] == 2

"""Provider incidents: stage 1 signals per partition, stage 2 counts distinct users."""

from __future__ import annotations

import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.alerting import (
    AlertEvaluator,
    IncidentConfig,
    IncidentCounter,
    IncidentSignal,
    incident_signal,
)
from pipeline.alerting.testing import T0_MS, make_stats
from schemas.alerts import AlertRule, Metric, Op
from schemas.notifications import NotificationType

W = 10_000


def sig(user: str, window: int, service: str = "openai") -> IncidentSignal:
    return IncidentSignal(service, T0_MS + window * W, T0_MS + (window + 1) * W, user)


def test_threshold_reached_once_per_window() -> None:
    counter = IncidentCounter(IncidentConfig(min_users=3))
    assert counter.on_signal(sig("a", 0)) is None
    assert counter.on_signal(sig("a", 0)) is None  # duplicate counts once
    assert counter.on_signal(sig("b", 0)) is None
    note = counter.on_signal(sig("c", 0))
    assert note is not None
    assert note.user_id == "*"
    assert note.template == "provider_incident"
    assert note.type == NotificationType.ERROR
    assert note.message.startswith("openai: 3 users see 5xx rates above their thresholds")
    assert note.notification_id == f"provider_incident:openai:{T0_MS}"
    assert counter.on_signal(sig("d", 0)) is None  # a fourth user: same window, no repeat


def test_ongoing_incident_is_not_repeated_until_it_clears() -> None:
    counter = IncidentCounter(IncidentConfig(min_users=2, clear_windows=3))
    notes = []
    for window in [0, 1, 2, 5, 9, 10]:
        for user in ("a", "b"):
            note = counter.on_signal(sig(user, window))
            if note is not None:
                notes.append(note)
    # 0,1,2,5 are one incident (gaps ≤ 3 windows); 9 starts another one
    assert [n.notification_id for n in notes] == [
        f"provider_incident:openai:{T0_MS}", f"provider_incident:openai:{T0_MS + 9 * W}",
    ]


def test_services_are_independent_and_late_signals_ignored() -> None:
    counter = IncidentCounter(IncidentConfig(min_users=2, horizon_windows=2))
    counter.on_signal(sig("a", 0, "openai"))
    assert counter.on_signal(sig("b", 0, "stripe")) is None
    counter.on_signal(sig("a", 10, "openai"))
    assert counter.on_signal(sig("b", 0, "openai")) is None  # too late: window pruned


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 4))
def test_partitions_merge_in_any_order(seed: int, partitions: int) -> None:
    """Users spread over partitions; each partition emits in window order, interleaved."""
    users = [f"u{i}" for i in range(6)]
    windows = {0: users[:2], 1: users[:4], 2: users, 3: users[:1]}
    streams: list[list[IncidentSignal]] = [[] for _ in range(partitions)]
    for window, active in windows.items():
        for user in active:
            streams[int(user[1:]) % partitions].append(sig(user, window))
    rng = random.Random(seed)
    merged: list[IncidentSignal] = []
    while any(streams):
        stream = rng.choice([s for s in streams if s])
        merged.append(stream.pop(0))
    counter = IncidentCounter(IncidentConfig(min_users=3))
    notes = []
    for i, signal in enumerate(merged):
        if i == len(merged) // 2:
            counter = pickle.loads(pickle.dumps(counter))
        note = counter.on_signal(signal)
        if note is not None:
            notes.append(note)
    assert len(notes) == 1
    assert notes[0].data["users"] == "3"
    assert counter.active_incident("openai") in ((T0_MS + W, T0_MS + 2 * W),)


def test_stage_one_signals_only_server_error_alerts() -> None:
    ev = AlertEvaluator()
    errors = AlertRule(rule_id="e", user_id="u1", name="e", metric=Metric.ERROR_RATE,
                       op=Op.GT, threshold=0.05)
    client = make_stats(window=0, requests=100, client_errors=30)
    ev.on_window(client, [errors])
    assert ev.is_firing("u1", "openai")
    assert incident_signal(ev, client) is None  # 4xx: the user's own fault
    server = make_stats(window=1, requests=100, server_errors=30, client_errors=5)
    ev.on_window(server, [errors])
    assert incident_signal(ev, server) == sig("u1", 1)
    ev5xx = AlertEvaluator()
    rule5xx = AlertRule(rule_id="s", user_id="u1", name="s", metric=Metric.SERVER_ERROR_RATE,
                        op=Op.GT, threshold=0.01)
    ev5xx.on_window(server, [rule5xx])
    assert incident_signal(ev5xx, server) == sig("u1", 1)
    healthy = make_stats(window=0, user_id="u2")
    assert incident_signal(ev5xx, healthy) is None

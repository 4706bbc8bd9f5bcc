"""Provider incidents: stage 1 signals per partition, stage 2 counts distinct users."""

from __future__ import annotations

import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.alerting import (
    AlertEvaluator,
    AlertingHook,
    IncidentConfig,
    IncidentCounter,
    IncidentInput,
    IncidentSignal,
    PopulationChange,
    TrafficHistory,
    incident_signal,
)
from pipeline.alerting.testing import T0_MS, make_stats
from schemas.alerts import AlertRule, Metric, Op
from schemas.notifications import Notification, NotificationType

W = 10_000


def sig(user: str, window: int, service: str = "openai") -> IncidentSignal:
    return IncidentSignal(service, T0_MS + window * W, T0_MS + (window + 1) * W, user)


def counter_for(config: IncidentConfig, *services: str, population: int = 10
                ) -> IncidentCounter:
    """A stage-2 counter that has heard of `population` trusted keys on each service."""
    counter = IncidentCounter(config)
    for service in services or ("openai",):
        for _ in range(population):
            assert counter.on_item(PopulationChange(service, 1)) is None
    return counter


def test_threshold_reached_once_per_window() -> None:
    counter = counter_for(IncidentConfig(min_users=3))
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
    counter = counter_for(IncidentConfig(min_users=2, clear_windows=3))
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
    counter = counter_for(IncidentConfig(min_users=2, horizon_windows=2), "openai", "stripe")
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
    counter = counter_for(IncidentConfig(min_users=3))
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


# -- trust: who may raise an incident -------------------------------------------------------

TRUST = IncidentConfig(min_users=3, min_known_users=10, population_share=0.1,
                       history_windows=30, history_min_requests=10)


def test_unknown_service_and_required_users_scale_with_population() -> None:
    counter = counter_for(TRUST, population=9)  # one short of known
    assert [counter.on_item(sig(u, 0)) for u in "abcdefghij"] == [None] * 10
    counter.on_item(PopulationChange("openai", 1))
    assert [counter.on_item(sig(u, 1)) for u in "ab"] == [None, None]
    assert counter.on_item(sig("c", 1)) is not None  # max(3, 10 % of 10)
    big = counter_for(TRUST, population=100)
    assert big.population("openai") == 100
    notes = [big.on_item(sig(f"u{i}", 0)) for i in range(10)]
    assert notes[:9] == [None] * 9  # 10 % of 100 users must signal in the window
    assert notes[9] is not None
    assert notes[9].data["users"] == "10"


def test_a_service_with_no_population_left_holds_no_state() -> None:
    counter = counter_for(TRUST, population=2)
    assert not counter.is_empty()
    counter.on_item(PopulationChange("openai", -1))
    counter.on_item(PopulationChange("openai", -1))
    assert counter.is_empty()
    assert counter.on_item(sig("a", 0)) is None
    assert counter.is_empty()  # a signal for an unknown service creates nothing


def test_traffic_history_counts_clean_windows_with_traffic() -> None:
    history = TrafficHistory(windows=3, min_requests=10)
    key = ("u1", "openai")
    assert history.observe(key, T0_MS, 9, signalled=False) is False  # too few requests
    assert len(history) == 0
    assert history.observe(key, T0_MS + W, 10, signalled=False) is False
    assert history.observe(key, T0_MS + W, 10, signalled=False) is False  # replayed window
    assert history.observe(key, T0_MS + 2 * W, 50, signalled=True) is False  # not clean
    assert history.observe(key, T0_MS + 3 * W, 50, signalled=False) is False
    assert not history.trusted(key)
    assert history.observe(key, T0_MS + 4 * W, 50, signalled=False) is True  # the 3rd
    assert history.trusted(key)
    assert history.observe(key, T0_MS + 5 * W, 50, signalled=False) is False  # once only
    history.observe(("u2", "openai"), T0_MS + 9 * W, 50, signalled=False)
    assert history.prune(T0_MS + 5 * W) == []
    assert history.prune(T0_MS + 6 * W) == [key]  # trusted: one less in the population
    assert history.prune(T0_MS + 10 * W) == []  # u2 untrusted: dropped silently
    assert len(history) == 0


def burst_hook(hook: AlertingHook, users: list[str], first: int, windows: int,
               errors: int, service: str = "openai") -> list[IncidentInput]:
    """`windows` windows of 20 requests (`errors` 5xx each) for every user."""
    items: list[IncidentInput] = []
    for w in range(first, first + windows):
        stats = [make_stats(user_id=u, service=service, window=w, requests=20,
                            server_errors=errors) for u in users]
        hook.on_windows(stats, T0_MS + (w + 1) * W)
        items += hook.take_signals()
    return items


def incidents_of(items: list[IncidentInput], config: IncidentConfig) -> list[Notification]:
    counter = IncidentCounter(config)
    notes = [counter.on_item(item) for item in items]
    return [n for n in notes if n is not None]


def test_three_fresh_accounts_cannot_raise_an_incident() -> None:
    hook = AlertingHook(incidents=TRUST)
    items = burst_hook(hook, ["a", "b", "c"], 0, 5, errors=10)
    assert items == []  # firing alerts, but no history: nothing leaves the partition
    assert incidents_of(items, TRUST) == []


def test_users_with_history_on_a_known_service_can() -> None:
    hook = AlertingHook(incidents=TRUST)
    users = [f"u{i}" for i in range(12)]
    items = burst_hook(hook, users, 0, 30, errors=0)  # 30 clean windows each
    assert items == [PopulationChange("openai", 1)] * 12
    items += burst_hook(hook, users[:3], 30, 3, errors=10)
    (note,) = incidents_of(items, TRUST)
    assert note.user_id == "*"
    assert note.data["users"] == "3"
    assert note.notification_id == f"provider_incident:openai:{T0_MS + 31 * W}"


def test_a_made_up_service_cannot() -> None:
    hook = AlertingHook(incidents=TRUST)
    # History on a real service does not vouch for another one
    items = burst_hook(hook, [f"u{i}" for i in range(12)], 0, 30, errors=0)
    items += burst_hook(hook, ["u0", "u1", "u2"], 30, 3, errors=10, service="made-up")
    assert incidents_of(items, TRUST) == []
    # ... and a few accounts with history on it do not make it known
    few = AlertingHook(incidents=TRUST)
    items = burst_hook(few, ["a", "b", "c", "d"], 0, 30, errors=0, service="made-up")
    items += burst_hook(few, ["a", "b", "c", "d"], 30, 3, errors=10, service="made-up")
    assert [i for i in items if isinstance(i, IncidentSignal)] != []  # they signal ...
    assert incidents_of(items, TRUST) == []  # ... but 4 < min_known_users


def test_pruned_trusted_keys_leave_the_population() -> None:
    hook = AlertingHook(incidents=TRUST, state_idle_seconds=600)
    items = burst_hook(hook, ["a", "b"], 0, 30, errors=0)
    assert hook.history.trusted(("a", "openai"))
    hook.on_windows([], T0_MS + 30 * W + 700_000)  # 700 s of silence
    items += hook.take_signals()
    assert items[-2:] == [PopulationChange("openai", -1)] * 2
    assert len(hook.history) == 0
    counter = IncidentCounter(TRUST)
    for item in items:
        counter.on_item(item)
    assert counter.is_empty()

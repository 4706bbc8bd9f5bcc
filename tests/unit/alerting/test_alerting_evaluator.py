"""The alert state machine: unit examples and hypothesis properties against an oracle."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from core.clock import to_ms
from pipeline.alerting import AlertEvaluator, EvaluatorConfig, alert_id
from pipeline.alerting.metrics import metric_value
from pipeline.alerting.testing import T0_MS, make_stats
from schemas.alerts import Alert, AlertRule, AlertState, Metric, Op, Severity
from schemas.stats import StatsRecord

WINDOW_MS = 10_000


def rule(**overrides: object) -> AlertRule:
    fields: dict[str, object] = {
        "rule_id": "r1", "user_id": "u1", "name": "errors", "metric": Metric.ERROR_RATE,
        "op": Op.GT, "threshold": 0.05, "for_windows": 1, "resolve_windows": 1,
        "min_requests": 20,
    }
    fields.update(overrides)
    return AlertRule(**fields)  # type: ignore[arg-type]


def errors(window: int, rate: float, requests: int = 200, user_id: str = "u1",
           service: str = "openai") -> StatsRecord:
    return make_stats(window=window, requests=requests, server_errors=round(rate * requests),
                      user_id=user_id, service=service)


def states(alerts: list[Alert]) -> list[str]:
    return [str(a.state) for a in alerts]


def test_for_windows_fires_once_and_resolve_windows_resolves_once() -> None:
    ev = AlertEvaluator()
    r = rule(for_windows=2, resolve_windows=2)
    seen: list[tuple[int, str]] = []
    pattern = [0.1, 0.1, 0.1, 0.1, 0.0, 0.2, 0.0, 0.0, 0.0]
    for w, rate in enumerate(pattern):
        seen += [(w, str(a.state)) for a in ev.on_window(errors(w, rate), [r])]
    assert seen == [(1, "firing"), (7, "resolved")]


def test_alert_record_fields_and_deterministic_id() -> None:
    ev = AlertEvaluator()
    r = rule(for_windows=2, severity=Severity.CRITICAL)
    ev.on_window(errors(0, 0.125, requests=200), [r])
    (fired,) = ev.on_window(errors(1, 0.125, requests=200), [r])
    assert fired.state == AlertState.FIRING
    assert fired.alert_id == alert_id("r1", "u1", "openai", T0_MS + WINDOW_MS)
    assert to_ms(fired.window_start) == T0_MS  # the breach streak
    assert to_ms(fired.window_end) == T0_MS + 2 * WINDOW_MS
    assert fired.fired_at == fired.window_end
    assert fired.resolved_at is None
    assert fired.value == 0.125
    assert fired.severity == Severity.CRITICAL
    (resolved,) = ev.on_window(errors(2, 0.01), [r])
    assert resolved.alert_id == fired.alert_id
    assert resolved.resolved_at == resolved.window_end
    assert resolved.fired_at == fired.fired_at
    assert ev.firing_count() == 0


def test_min_requests_window_is_no_data() -> None:
    ev = AlertEvaluator()
    r = rule(for_windows=2, min_requests=50)
    assert ev.on_window(errors(0, 0.5), [r]) == []
    # 10 requests, all failing: below min_requests, neither breach nor clean
    assert ev.on_window(errors(1, 1.0, requests=10), [r]) == []
    assert states(ev.on_window(errors(2, 0.5), [r])) == ["firing"]
    assert ev.on_window(errors(3, 0.0, requests=10), [r]) == []
    assert ev.is_firing("u1", "openai")
    assert states(ev.on_window(errors(4, 0.0), [r])) == ["resolved"]


def test_idle_resolves_with_deterministic_resolved_at() -> None:
    ev = AlertEvaluator(EvaluatorConfig(idle_resolve_windows=5))
    r = rule()
    (fired,) = ev.on_window(errors(0, 0.5), [r])
    last_end = T0_MS + WINDOW_MS
    assert ev.next_deadline_ms() == last_end + 5 * WINDOW_MS
    assert ev.on_idle(last_end + 5 * WINDOW_MS - 1) == []
    (resolved,) = ev.on_idle(last_end + 60 * WINDOW_MS)
    assert resolved.alert_id == fired.alert_id
    assert to_ms(resolved.resolved_at) == last_end + 5 * WINDOW_MS  # type: ignore[arg-type]
    assert "no traffic" in resolved.message
    assert ev.next_deadline_ms() is None
    # the same outcome without on_idle: the next window notices the silence
    ev2 = AlertEvaluator()
    ev2.on_window(errors(0, 0.5), [r])
    out = ev2.on_window(errors(9, 0.5), [r])
    assert states(out) == ["resolved", "firing"]
    assert out[0] == resolved
    assert out[1].alert_id != fired.alert_id


def test_low_traffic_counts_towards_idle() -> None:
    ev = AlertEvaluator(EvaluatorConfig(idle_resolve_windows=3))
    r = rule()
    ev.on_window(errors(0, 0.5), [r])
    assert ev.on_window(errors(1, 1.0, requests=5), [r]) == []
    assert ev.on_window(errors(2, 1.0, requests=5), [r]) == []
    assert states(ev.on_window(errors(3, 1.0, requests=5), [r])) == ["resolved"]


def test_rule_change_applies_at_next_window() -> None:
    ev = AlertEvaluator()
    strict = rule(threshold=0.05)
    ev.on_window(errors(0, 0.08), [strict])  # fires at 8 % > 5 %
    lax = rule(threshold=0.10, version=2)
    out = ev.on_window(errors(1, 0.08), [lax])
    assert states(out) == ["resolved"]
    assert out[0].threshold == 0.10
    assert "back to 8% (≤ 10%)" in out[0].message


def test_deleted_or_disabled_rule_resolves_at_next_window() -> None:
    for rules in ([], [rule(enabled=False)], [rule(service="stripe")]):
        ev = AlertEvaluator()
        (fired,) = ev.on_window(errors(0, 0.5), [rule()])
        (resolved,) = ev.on_window(errors(1, 0.5), rules)
        assert resolved.state == AlertState.RESOLVED
        assert resolved.alert_id == fired.alert_id
        assert "deleted or disabled" in resolved.message
        assert ev.firing_count() == 0


def test_metric_change_ends_the_episode() -> None:
    ev = AlertEvaluator()
    ev.on_window(errors(0, 0.5), [rule()])
    latency = rule(metric=Metric.LATENCY_P95_MS, threshold=50.0)
    out = ev.on_window(errors(1, 0.5), [latency])
    assert states(out) == ["resolved", "firing"]
    assert out[0].metric == Metric.ERROR_RATE
    assert out[1].metric == Metric.LATENCY_P95_MS


def test_service_filter_and_keys_are_independent() -> None:
    ev = AlertEvaluator()
    only_openai = rule(service="openai")
    assert ev.on_window(errors(0, 0.5, service="stripe"), [only_openai]) == []
    a = ev.on_window(errors(0, 0.5, service="openai"), [only_openai])
    b = ev.on_window(errors(0, 0.5, user_id="u2"), [rule(user_id="u2")])
    assert a[0].alert_id != b[0].alert_id
    assert (a[0].user_id, b[0].user_id) == ("u1", "u2")


def test_replayed_window_changes_nothing() -> None:
    ev = AlertEvaluator()
    r = rule(for_windows=3)
    ev.on_window(errors(0, 0.5), [r])
    ev.on_window(errors(1, 0.5), [r])
    assert ev.on_window(errors(1, 0.5), [r]) == []
    assert states(ev.on_window(errors(2, 0.5), [r])) == ["firing"]


def test_every_metric_is_readable() -> None:
    s = make_stats(requests=100, server_errors=3, client_errors=2, latency_ms=250.0,
                   tokens_in=7, tokens_out=5, cost_usd=1.5)
    expected = {
        Metric.ERROR_RATE: 0.05, Metric.SERVER_ERROR_RATE: 0.03, Metric.SUCCESS_RATE: 0.95,
        Metric.LATENCY_P50_MS: 250.0, Metric.LATENCY_P95_MS: 250.0,
        Metric.LATENCY_P99_MS: 250.0, Metric.LATENCY_AVG_MS: 250.0, Metric.REQUESTS: 100.0,
        Metric.COST_USD: 1.5, Metric.TOKENS: 12.0,
    }
    assert set(expected) == set(Metric) - {Metric.REQUESTS_ANOMALY}
    for metric, value in expected.items():
        assert metric_value(metric, s) == value
    for op, breach in ((Op.GT, False), (Op.GE, True), (Op.LT, False), (Op.LE, True)):
        ev = AlertEvaluator()
        r = rule(metric=Metric.REQUESTS, op=op, threshold=100.0)
        assert bool(ev.on_window(s, [r])) is breach


def test_healthy_keys_hold_no_state() -> None:
    ev = AlertEvaluator()
    rules = [rule(rule_id=f"r{i}", threshold=0.5) for i in range(10)]
    for user in range(100):
        for w in range(3):
            ev.on_window(errors(w, 0.01, user_id=f"u{user}"), rules)
    assert len(pickle.dumps(ev)) < 1000


# -- properties ----------------------------------------------------------------------------

IDLE = 3


@dataclass(frozen=True)
class Step:
    gap: int  # windows skipped before this one (no traffic)
    requests: int
    error_rate: float
    rule: AlertRule | None  # None: the rule is deleted for this window
    idle_probe: bool  # call on_idle just before this window closes


# Each strategy reaches its limit from both sides: gaps of IDLE - 1, IDLE and IDLE + 1 windows
# (the idle boundary, both in `on_window` and in an `on_idle` probe), request counts equal to
# `min_requests` and one either side, error rates equal to a threshold.
THRESHOLDS = [0.05, 0.2, 0.5]
MIN_REQUESTS = [0, 20, 60]
rules_st = st.builds(
    rule,
    threshold=st.sampled_from(THRESHOLDS),
    for_windows=st.integers(1, 3),
    resolve_windows=st.integers(1, 3),
    min_requests=st.sampled_from(MIN_REQUESTS),
)
steps_st = st.lists(
    st.builds(
        Step,
        gap=st.one_of(st.just(0), st.just(0), st.sampled_from([1, IDLE - 1, IDLE, IDLE + 1]),
                      st.integers(0, 3 * IDLE)),
        requests=st.sampled_from([10, 19, 20, 21, 59, 60, 61, 100]),
        error_rate=st.sampled_from([0.0, 0.1, 0.3, 0.6, *THRESHOLDS]),
        rule=st.one_of(rules_st, rules_st, rules_st, st.none()),
        idle_probe=st.booleans(),
    ),
    max_size=40,
)


def run(ev: AlertEvaluator, steps: list[Step], start_window: int = 0) -> list[Alert]:
    out: list[Alert] = []
    window = start_window
    for step in steps:
        window += step.gap
        if step.idle_probe:
            out += ev.on_idle(T0_MS + window * WINDOW_MS)
        rules = [] if step.rule is None else [step.rule]
        out += ev.on_window(errors(window, step.error_rate, requests=step.requests), rules)
        window += 1
    return out


def oracle(steps: list[Step], final_probe: int | None = None) -> list[tuple[str, int, str]]:
    """The contract, spelled out naively: (state, window, cause) per transition.

    `final_probe`: `on_idle` once more, that many windows after the last step's window."""
    out: list[tuple[str, int, str]] = []
    firing, breaches, cleans, last_end = False, 0, 0, None
    window = 0
    for step in steps:
        window += step.gap
        r = step.rule
        end = window + 1
        if step.idle_probe and last_end is not None and window - last_end >= IDLE:
            if firing:
                out.append(("resolved", last_end + IDLE, "idle"))
            firing, breaches, cleans, last_end = False, 0, 0, None
        if r is None:
            if firing:
                out.append(("resolved", window, "withdrawn"))
            firing, breaches, cleans, last_end = False, 0, 0, None
        elif step.requests < r.min_requests:
            if last_end is not None and end - last_end >= IDLE:
                if firing:
                    out.append(("resolved", last_end + IDLE, "idle"))
                firing, breaches, cleans, last_end = False, 0, 0, None
        else:
            if last_end is not None and window - last_end >= IDLE:
                if firing:
                    out.append(("resolved", last_end + IDLE, "idle"))
                firing, breaches, cleans, last_end = False, 0, 0, None
            breach = round(step.error_rate * step.requests) / step.requests > r.threshold
            if not firing:
                breaches = breaches + 1 if breach else 0
                last_end = end if breach else None
                if breaches >= r.for_windows:
                    firing, cleans = True, 0
                    out.append(("firing", window, ""))
            else:
                last_end = end
                cleans = 0 if breach else cleans + 1
                if cleans >= r.resolve_windows:
                    out.append(("resolved", window, "clean"))
                    firing, breaches, cleans, last_end = False, 0, 0, None
        window += 1
    if (final_probe is not None and firing and last_end is not None
            and window + final_probe - last_end >= IDLE):
        out.append(("resolved", last_end + IDLE, "idle"))
    return out


def cause(alert: Alert) -> str:
    if alert.state == AlertState.FIRING:
        return ""
    if "no traffic" in alert.message:
        return "idle"
    if "deleted or disabled" in alert.message:
        return "withdrawn"
    return "clean"


@settings(max_examples=300, deadline=None)
@given(steps_st, st.sampled_from([0, IDLE - 1, IDLE, IDLE + 1]))
def test_state_machine_matches_the_contract(steps: list[Step], final_probe: int) -> None:
    """Every transition as the oracle has it; a last `on_idle` probe around the idle limit
    (nothing after it could resolve the key in its place)."""
    ev = AlertEvaluator(EvaluatorConfig(idle_resolve_windows=IDLE))
    alerts = run(ev, steps)
    after_last = sum(step.gap + 1 for step in steps)
    alerts += ev.on_idle(T0_MS + (after_last + final_probe) * WINDOW_MS)
    got = []
    for a in alerts:
        window = (to_ms(a.window_end) - T0_MS) // WINDOW_MS - 1
        if cause(a) == "idle":  # resolved_at: the end of the last data window + idle time
            window = (to_ms(a.resolved_at) - T0_MS) // WINDOW_MS  # type: ignore[arg-type]
        got.append((str(a.state), window, cause(a)))
    assert got == oracle(steps, final_probe)


@settings(max_examples=300, deadline=None)
@given(steps_st)
def test_never_two_firing_without_resolved(steps: list[Step]) -> None:
    alerts = run(AlertEvaluator(EvaluatorConfig(idle_resolve_windows=IDLE)), steps)
    open_id: str | None = None
    ids: set[str] = set()
    for a in alerts:
        if a.state == AlertState.FIRING:
            assert open_id is None
            assert a.alert_id not in ids
            open_id = a.alert_id
            ids.add(a.alert_id)
        else:
            assert a.alert_id == open_id
            assert a.resolved_at is not None and a.resolved_at >= a.fired_at
            open_id = None


@settings(max_examples=200, deadline=None)
@given(steps_st, st.data())
def test_replay_from_snapshot_is_identical(steps: list[Step], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(steps)))
    config = EvaluatorConfig(idle_resolve_windows=IDLE)
    straight = run(AlertEvaluator(config), steps)
    first = AlertEvaluator(config)
    head = run(first, steps[:cut])
    restored: AlertEvaluator = pickle.loads(pickle.dumps(first))
    offset = sum(s.gap + 1 for s in steps[:cut])
    tail = run(restored, steps[cut:], start_window=offset)
    # and replaying the tail again from the same snapshot gives the same records
    again = run(pickle.loads(pickle.dumps(first)), steps[cut:], start_window=offset)
    enc = msgspec.json.encode
    assert [enc(a) for a in head + tail] == [enc(a) for a in straight]
    assert [enc(a) for a in again] == [enc(a) for a in tail]

"""requests_anomaly: quiet on Poisson traffic, quick on spikes, robust baseline."""

from __future__ import annotations

import math
import pickle
import random

from pipeline.alerting import AlertEvaluator, AnomalyDetector, RuleBook
from pipeline.alerting.testing import make_stats
from schemas.alerts import AlertState, Metric

KEY = ("u1", "openai")


def poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method, in chunks of 30 so exp(-lam) stays representable."""
    total = 0
    while lam > 0:
        chunk = min(lam, 30.0)
        lam -= chunk
        limit, k, p = math.exp(-chunk), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        total += k
    return total


def anomaly_rules() -> tuple:  # type: ignore[type-arg]
    return tuple(r for r in RuleBook().rules_for("u1", "openai")
                 if r.metric == Metric.REQUESTS_ANOMALY)


def test_steady_poisson_traffic_rarely_alerts() -> None:
    rules = anomaly_rules()
    for seed in (1, 2, 3):
        rng = random.Random(seed)
        ev = AlertEvaluator()
        fired = 0
        for w in range(1_000):
            out = ev.on_window(make_stats(window=w, requests=poisson(rng, 100)), rules)
            fired += sum(a.state == AlertState.FIRING for a in out)
        assert fired <= 1, f"seed {seed}: {fired} false alerts"


def test_five_fold_spike_is_caught_in_its_window_and_not_learned() -> None:
    rules = anomaly_rules()
    rng = random.Random(7)
    ev = AlertEvaluator()
    for w in range(200):
        assert ev.on_window(make_stats(window=w, requests=poisson(rng, 100)), rules) == []
    before = ev.anomaly.baseline(KEY)
    assert before is not None
    (fired,) = ev.on_window(make_stats(window=200, requests=poisson(rng, 500)), rules)
    assert fired.state == AlertState.FIRING
    assert fired.value > 4
    assert "spike" in fired.message and "baseline of" in fired.message
    after = ev.anomaly.baseline(KEY)
    assert after is not None
    assert after[0] - before[0] < 10  # damped: moved by at most alpha·clip_z·std
    assert after[1] == before[1]  # no variance learned from the outlier
    (resolved,) = ev.on_window(make_stats(window=201, requests=poisson(rng, 100)), rules)
    assert resolved.state == AlertState.RESOLVED
    assert resolved.alert_id == fired.alert_id
    assert "back in band" in resolved.message


def test_lasting_level_shift_is_adopted_eventually() -> None:
    rng = random.Random(3)
    det = AnomalyDetector()
    for w in range(100):
        det.observe(KEY, poisson(rng, 100), w * 10_000, 10_000)
    z_scores = [det.observe(KEY, poisson(rng, 500), w * 10_000, 10_000)
                for w in range(100, 300)]
    assert all(z is not None for z in z_scores)
    high = [z.z > 4 for z in z_scores if z is not None]
    assert high[0]
    assert not any(high[-50:])


def test_warmup_gaps_and_reset() -> None:
    det = AnomalyDetector()
    for w in range(20):  # 20 windows of warm-up, the 21st is scored
        assert det.observe(KEY, 100, w * 10_000, 10_000) is None
    assert det.observe(KEY, 100, 20 * 10_000, 10_000) is not None
    # a replayed window is neither scored nor learned
    assert det.observe(KEY, 900, 20 * 10_000, 10_000) is None
    # five silent windows are learned as zeros
    mean_before = det.baseline(KEY)[0]  # type: ignore[index]
    det.observe(KEY, 100, 25 * 10_000, 10_000)
    assert det.baseline(KEY)[0] < mean_before  # type: ignore[index]
    # a long silence forgets the baseline: warm-up again
    assert det.observe(KEY, 100, 1_000 * 10_000, 10_000) is None
    assert det.baseline(KEY)[2] == 1  # type: ignore[index]
    assert det.prune(2_000 * 10_000) == 1
    assert len(det) == 0


def test_small_absolute_changes_and_min_requests_do_not_fire() -> None:
    rules = anomaly_rules()
    ev = AlertEvaluator()
    for w in range(50):
        ev.on_window(make_stats(window=w, requests=2, server_errors=0), rules)
    # 2 → 11 is z ≈ 6 but only 9 requests more, and below min_requests
    assert ev.on_window(make_stats(window=50, requests=11), rules) == []


def test_snapshot_round_trip_keeps_scores() -> None:
    rng = random.Random(5)
    a = AnomalyDetector()
    counts = [poisson(rng, 50) for _ in range(60)]
    for w, c in enumerate(counts[:30]):
        a.observe(KEY, c, w * 10_000, 10_000)
    b: AnomalyDetector = pickle.loads(pickle.dumps(a))
    for w, c in enumerate(counts[30:], start=30):
        assert a.observe(KEY, c, w * 10_000, 10_000) == b.observe(KEY, c, w * 10_000, 10_000)

"""`/healthz` reflects a dead or stuck pipeline; `/metrics` serves Prometheus text."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api import create_app
from core import metrics
from core.clock import ManualClock
from core.settings import Settings
from pipeline.metrics import PipelineMetrics
from pipeline.runner import PipelineHealth

LAG = 120


def test_healthz_is_ok_without_checks(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_healthz_answers_503_with_the_first_reason(api_settings: Settings) -> None:
    checks = [lambda: None, lambda: "pipeline stopped: boom", lambda: "never asked"]
    with TestClient(create_app(api_settings, health_checks=checks)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unhealthy", "reason": "pipeline stopped: boom"}


def _health(clock: ManualClock) -> tuple[PipelineHealth, PipelineMetrics]:
    counters = PipelineMetrics()
    return PipelineHealth(LAG, metrics=counters, clock=clock), counters


def test_a_pipeline_that_never_hands_over_a_batch_is_stuck_after_the_bound() -> None:
    clock = ManualClock()
    health, _ = _health(clock)
    clock.advance(LAG)
    assert health.problem() is None
    clock.advance(1)
    assert health.problem() == "no batch from Kafka in the 121 s since start"


def test_a_partition_without_a_batch_for_the_bound_is_stuck() -> None:
    clock = ManualClock()
    health, counters = _health(clock)
    counters.batch_at.update({0: clock.now, 1: clock.now})
    clock.advance(LAG)
    counters.batch_at[0] = clock.now
    assert health.problem() is None  # exactly at the bound
    clock.advance(1)
    counters.batch_at[0] = clock.now
    assert health.problem() == "partition 1: no batch for 121 s"


def test_a_caught_up_partition_whose_watermark_stands_still_is_stuck() -> None:
    clock = ManualClock()
    health, counters = _health(clock)
    mark = int(clock.now * 1000) - 5000
    for _ in range(LAG + 1):  # batches keep coming; the watermark never moves
        counters.batch_at[0] = clock.now
        counters.caught_up[0] = True
        counters.watermark_ms[0] = mark
        assert health.problem() is None
        clock.advance(1)
    counters.batch_at[0] = clock.now
    assert health.problem() == "partition 0: caught up, yet its watermark stood still for 121 s"


def test_a_quiet_partition_with_an_old_watermark_is_healthy() -> None:
    """Caught up after old events, the watermark lags wall time by a constant: not stuck."""
    clock = ManualClock()
    health, counters = _health(clock)
    mark = int(clock.now * 1000) - 3_600_000  # an hour behind, and it stays so
    for _ in range(3 * LAG):
        mark += 1000
        counters.batch_at[0] = clock.now
        counters.caught_up[0] = True
        counters.watermark_ms[0] = mark
        assert health.problem() is None
        clock.advance(1)


def test_a_backlog_whose_watermark_waits_is_not_stuck() -> None:
    clock = ManualClock()
    health, counters = _health(clock)
    for _ in range(2 * LAG):
        counters.batch_at[0] = clock.now
        counters.caught_up[0] = False  # reading a backlog of old events
        counters.watermark_ms[0] = 1_000
        assert health.problem() is None
        clock.advance(1)


def test_healthz_reports_a_stuck_pipeline(api_settings: Settings) -> None:
    clock = ManualClock()
    health, counters = _health(clock)
    counters.batch_at[3] = clock.now
    with TestClient(create_app(api_settings, health_checks=[health.problem])) as client:
        assert client.get("/healthz").status_code == 200
        clock.advance(LAG + 5)
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["reason"] == "partition 3: no batch for 125 s"


def test_metrics_serves_the_registered_counters(client: TestClient) -> None:
    metrics.register("apitest", lambda: {"answers": 42, "label": "not a number"})
    try:
        response = client.get("/metrics")
    finally:
        metrics.unregister("apitest")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "keypulse_apitest_answers 42\n" in response.text
    assert "label" not in response.text


def test_system_stats_carry_every_part(client: TestClient) -> None:
    metrics.register("apitest", lambda: {"per_partition": {0: 1.5}})
    try:
        response = client.get("/api/system/stats")
    finally:
        metrics.unregister("apitest")
    assert response.status_code == 200
    body = response.json()
    assert body["parts"]["apitest"] == {"per_partition": {"0": 1.5}}
    assert body["process"]["rss"] > 0

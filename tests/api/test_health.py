"""`/healthz` reflects a dead or stuck pipeline; `/readyz` names every failing check, each
probe bounded and cached; `/metrics` serves Prometheus text; request latency by route."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from api import create_app
from core import metrics
from core.clock import ManualClock
from core.errors import ServiceError
from core.settings import Settings
from core.telemetry import Probe, Telemetry, kafka_probe
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


def test_an_undescribed_part_is_served_untyped_under_its_old_name(client: TestClient) -> None:
    metrics.register("apitest", lambda: {"answers": 42, "label": "not a number"})
    try:
        response = client.get("/metrics")
    finally:
        metrics.unregister("apitest")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert "# TYPE keypulse_apitest_answers untyped\n" in response.text
    assert "keypulse_apitest_answers 42.0\n" in response.text
    assert "keypulse_apitest_label" not in response.text


# -- readiness ------------------------------------------------------------------------------


class Looks:
    """A probe's look that fails while `problem` is set, counting how often it ran."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self.count = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self) -> None:
        self.count += 1
        self.release.wait(10)
        if self.problem is not None:
            raise ServiceError(self.problem)


def test_a_probe_looks_once_per_ttl_and_names_itself_when_it_fails() -> None:
    now = [0.0]
    looks = Looks()
    probe = Probe("kafka", looks, ttl=1.5, monotonic=lambda: now[0])
    assert probe() is None
    looks.problem = "no answer from 127.0.0.1:1 within 1 s"
    assert probe() is None  # cached
    now[0] = 1.4
    assert probe() is None and looks.count == 1
    now[0] = 1.6
    assert probe() == "kafka: no answer from 127.0.0.1:1 within 1 s"
    assert looks.count == 2


def test_a_probe_that_hangs_answers_within_its_timeout() -> None:
    looks = Looks()
    looks.release.clear()
    probe = Probe("clickhouse", looks, timeout=0.05)
    try:
        assert probe() == "clickhouse: no answer within 0.05 s"
        assert probe() == "clickhouse: no answer within 0.05 s"
        assert looks.count == 1  # one look at a time, however many ask
    finally:
        looks.release.set()


def test_readyz_names_every_failing_check(api_settings: Settings) -> None:
    kafka, clickhouse = Looks(), Looks()
    telemetry = Telemetry(readiness=[Probe("kafka", kafka, ttl=0),
                                     Probe("clickhouse", clickhouse, ttl=0)])
    app = create_app(api_settings, telemetry=telemetry,
                     health_checks=[lambda: None])
    with TestClient(app) as client:
        assert client.get("/readyz").json() == {"status": "ready"}
        kafka.problem, clickhouse.problem = "down", "SELECT 1 failed"
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"status": "not_ready",
                                   "reason": "kafka: down; clickhouse: SELECT 1 failed"}
        assert client.get("/healthz").status_code == 200  # liveness does not ask the probes


def test_readyz_fails_with_the_pipeline(api_settings: Settings) -> None:
    app = create_app(api_settings, health_checks=[lambda: "pipeline stopped: boom"])
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "not_ready", "reason": "pipeline stopped: boom"}


def test_the_kafka_probe_fails_on_a_port_nobody_listens_on(api_settings: Settings) -> None:
    probe = kafka_probe(api_settings, timeout=0.2)  # api_settings: 127.0.0.1:1
    assert probe() == "kafka: no answer from 127.0.0.1:1 within 0.2 s"


# -- HTTP latency by route -------------------------------------------------------------------


def test_request_latency_is_labelled_by_route_template(client: TestClient) -> None:
    for rule in ("r1", "r2", "r3"):
        assert client.get(f"/v1/alert-rules/{rule}").status_code == 401
    assert client.get("/no/such/path").status_code == 404
    assert client.post("/healthz").status_code == 405
    registry = client.app.state.telemetry.registry  # type: ignore[attr-defined]

    def count(method: str, route: str, status: str) -> float | None:
        return registry.get_sample_value("keypulse_api_request_duration_seconds_count",
                                         {"method": method, "route": route, "status": status})

    assert count("GET", "/v1/alert-rules/{rule_id}", "4xx") == 3
    assert count("GET", "unmatched", "4xx") == 1
    assert count("POST", "/healthz", "4xx") == 1
    assert not [s for s in registry.collect() for s in s.samples if "r1" in s.labels.values()]

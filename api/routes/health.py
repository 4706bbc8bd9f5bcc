"""Liveness, readiness and Prometheus metrics (core.telemetry; docs/operations.md).

`/healthz` asks each of the app's health checks (`create_app(health_checks=...)`; `keypulse
run` passes the embedded pipeline's) why it is not healthy: 200 `{"status": "ok"}`, or 503
`{"status": "unhealthy", "reason": ...}` with the first reason. Checks read counters in
memory: cheap enough for a probe every second.

`/readyz` asks the same checks and the app's readiness probes (`Telemetry.readiness`: Kafka,
ClickHouse, given by the command that serves the app), each answer cached ~1.5 s: 200
`{"status": "ready"}`, or 503 `{"status": "not_ready", "reason": ...}` naming every failing one.

`/metrics` is the app's registry (`app.state.telemetry`) in the library's exposition format.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.responses import MsgspecResponse, schema
from core import telemetry
from core.telemetry import Health, Readiness, Telemetry

router = APIRouter(tags=["health"])

METRICS_EXAMPLE = """# HELP keypulse_pipeline_events_in_total events read from Kafka
# TYPE keypulse_pipeline_events_in_total counter
keypulse_pipeline_events_in_total 1000.0
"""


def _json(status: int, description: str, example: msgspec.Struct
          ) -> dict[int | str, dict[str, Any]]:
    """Like api.responses.described, with an example (a 503 answers the same type)."""
    return {status: {"description": description, "content": {"application/json": {
        "schema": schema(type(example)), "example": msgspec.to_builtins(example)}}}}


@router.get(
    "/healthz",
    summary="liveness",
    responses={
        **_json(200, "every health check passes", Health("ok")),
        **_json(503, "a check failed (the embedded pipeline is dead or stuck)",
                Health("unhealthy", "pipeline: no progress for 60 s")),
    },
)
def healthz(request: Request) -> MsgspecResponse:
    """Unauthenticated and cheap (counters in memory): for a probe every second. 503 with the
    first failing check's reason."""
    answer = telemetry.health(request.app.state.health_checks)
    return MsgspecResponse(answer, status_code=200 if answer.status == "ok" else 503)


@router.get(
    "/readyz",
    summary="readiness",
    responses={
        **_json(200, "Kafka and ClickHouse answer, and the embedded pipeline runs",
                Readiness("ready")),
        **_json(503, "something this process needs is not there; `reason` names every "
                     "failing check (docs/operations.md)",
                Readiness("not_ready", "kafka: no answer from 127.0.0.1:9092 within 1 s")),
    },
)
def readyz(request: Request) -> MsgspecResponse:
    """Unauthenticated; each probe looks at most every ~1.5 s and answers within ~1.5 s: for
    a load balancer's probe every second."""
    app_telemetry: Telemetry = request.app.state.telemetry
    answer = telemetry.readiness([*request.app.state.health_checks, *app_telemetry.readiness])
    return MsgspecResponse(answer, status_code=200 if answer.status == "ready" else 503)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {
        "description": "the Prometheus text exposition (HELP and TYPE lines, counters, gauges, "
                       "histograms); OpenMetrics when the Accept header asks for it",
        "content": {
            "text/plain": {"schema": {"type": "string"}, "example": METRICS_EXAMPLE},
            "application/openmetrics-text": {"schema": {"type": "string"}},
        },
    }},
)
def prometheus(request: Request) -> Response:
    """The process's registry (every part's counters, the histograms, process CPU and
    memory), unauthenticated, for a Prometheus scrape."""
    app_telemetry: Telemetry = request.app.state.telemetry
    body, content_type = app_telemetry.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)

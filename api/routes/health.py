"""Liveness and Prometheus metrics.

`/healthz` asks each of the app's health checks (`create_app(health_checks=...)`; `keypulse
run` passes the embedded pipeline's) why it is not healthy: 200 `{"status": "ok"}`, or 503
`{"status": "unhealthy", "reason": ...}` with the first reason. Checks read counters in
memory: cheap enough for a probe every second.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from api.responses import MsgspecResponse
from core import metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "the pipeline is dead or stuck"}})
def healthz(request: Request) -> MsgspecResponse:
    for check in request.app.state.health_checks:
        reason = check()
        if reason is not None:
            return MsgspecResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    return MsgspecResponse({"status": "ok"})


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus() -> str:
    return metrics.prometheus_text(metrics.collect())

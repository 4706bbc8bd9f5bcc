"""Liveness and Prometheus metrics.

`/healthz` asks each of the app's health checks (`create_app(health_checks=...)`; `keypulse
run` passes the embedded pipeline's) why it is not healthy: 200 `{"status": "ok"}`, or 503
`{"status": "unhealthy", "reason": ...}` with the first reason. Checks read counters in
memory: cheap enough for a probe every second.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from api.responses import MsgspecResponse, schema
from core import metrics

router = APIRouter(tags=["health"])


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    status: Literal["ok", "unhealthy"]
    reason: str | None = None  # why not, when unhealthy: the first failing check's answer


def _health(status: int, description: str, example: Health) -> dict[int | str, dict[str, Any]]:
    """Like api.responses.described, with an example (503 answers a Health too)."""
    return {status: {"description": description, "content": {"application/json": {
        "schema": schema(Health), "example": msgspec.to_builtins(example)}}}}


@router.get(
    "/healthz",
    summary="liveness",
    responses={
        **_health(200, "every health check passes", Health("ok")),
        **_health(503, "a check failed (the embedded pipeline is dead or stuck)",
                  Health("unhealthy", "pipeline: no progress for 60 s")),
    },
)
def healthz(request: Request) -> MsgspecResponse:
    """Unauthenticated and cheap (counters in memory): for a probe every second. 503 with the
    first failing check's reason."""
    for check in request.app.state.health_checks:
        reason = check()
        if reason is not None:
            return MsgspecResponse(Health("unhealthy", reason), status_code=503)
    return MsgspecResponse(Health("ok"))


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    responses={200: {"description": "Prometheus text exposition, one `keypulse_<part>_<name> "
                                    "<value>` line per counter",
                     "content": {"text/plain": {
                         "schema": {"type": "string"},
                         "example": "keypulse_api_requests 42\nkeypulse_pipeline_events 1000\n",
                     }}}},
)
def prometheus() -> str:
    """Every registered part's counters, unauthenticated, for a Prometheus scrape."""
    return metrics.prometheus_text(metrics.collect())

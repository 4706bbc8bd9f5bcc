"""`POST /v1/events` (DESIGN §8): usage events over HTTP, onto `usage.events` keyed by
`user_id`, answered once Kafka confirmed them.

Who: `ingest` (events for any user) and `user` (only its own `user_id`; a token without roles
acts as `user`). Another user's event in a `user` token's batch is rejected on its own, with a
reason, like any invalid event. Each event is checked as the pipeline checks it
(schemas.events.decode_event, then the event-time admission of schemas.events.ts_bounds and
ts_reason), so an accepted event is one the pipeline takes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import msgspec
from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentUserDep, PublisherDep, SettingsDep
from api.errors import APIError
from api.ingest import (
    MAX_EVENTS,
    EventProducer,
    RateLimiter,
    parse_batch,
    read_body,
    retry_after,
    value_of,
)
from api.responses import MsgspecResponse, described, failures, schema
from core.auth import INGEST_ROLE, USER_ROLE
from core.clock import Clock
from core.settings import Settings
from schemas.events import InvalidEvent, UsageEvent, decode_event, ts_bounds, ts_reason

logger = logging.getLogger(__name__)


class Rejection(msgspec.Struct, frozen=True):
    index: int  # the event's position in the batch, from 0
    reason: str  # the pipeline's reason, e.g. "status_code: expected `int` <= 599"


class IngestResult(msgspec.Struct, frozen=True):
    accepted: int
    rejected: list[Rejection]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        producer: EventProducer | None = getattr(app.state, "event_producer", None)
        if producer is not None:
            await run_in_threadpool(producer.close)


router = APIRouter(prefix="/v1", tags=["events"], lifespan=_lifespan)

_EXAMPLES = resources.files("schemas") / "examples" / "usage.events" / "1"
_BODY_SCHEMA = schema(list[UsageEvent])
_BODY_SCHEMA["maxItems"] = MAX_EVENTS
_REQUEST_BODY: dict[str, Any] = {"requestBody": {
    "required": True,
    "description": (f"a JSON array of at most {MAX_EVENTS} events (or {{\"events\": [...]}}), "
                    "at most 1 MiB, optionally `Content-Encoding: gzip`"),
    "content": {"application/json": {"schema": _BODY_SCHEMA, "examples": {
        name: {"summary": f"schemas/examples/usage.events/1/{name}.json",
               "value": [json.loads(example.read_text())]}
        for name in ("full_llm_call", "minimal")
        if (example := _EXAMPLES / f"{name}.json").is_file()}}},  # absent from a wheel
}}
_ERRORS = failures({
    400: "the body is not JSON, or not valid gzip",
    401: "no valid bearer token",
    403: "the token holds neither the ingest nor the user role",
    413: f"more than {MAX_EVENTS} events or 1 MiB (sent or inflated)",
    415: "a Content-Encoding other than gzip",
    422: "JSON that is not an array of events nor {\"events\": [...]}",
    429: "the caller's rate limit; see Retry-After",
    503: "Kafka did not confirm the events; see Retry-After",
})


def _limiter(request: Request, settings: Settings) -> RateLimiter:
    """The app's rate limiter, made on first use."""
    state = request.app.state
    limiter: RateLimiter | None = getattr(state, "ingest_limiter", None)
    if limiter is None:
        clock: Clock = state.clock
        limiter = state.ingest_limiter = RateLimiter(
            settings.ingest_rate_per_second, settings.ingest_burst, clock)
    return limiter


@router.post("/events", status_code=202, openapi_extra=_REQUEST_BODY,
             summary="ingest usage events",
             responses={**described(IngestResult, 202, "Kafka confirmed the accepted events"),
                        **_ERRORS})
async def post_events(request: Request, user: CurrentUserDep, settings: SettingsDep,
                      producer: PublisherDep) -> MsgspecResponse:
    """Validates each event as the pipeline does and produces the valid ones to
    `usage.events` (key `user_id`); answers once Kafka confirmed them all."""
    roles = user.roles or (USER_ROLE,)
    any_user = INGEST_ROLE in roles
    if not any_user and USER_ROLE not in roles:
        raise APIError(403, "forbidden", "this needs the ingest or user role")
    limiter = _limiter(request, settings)
    raws = parse_batch(await read_body(request))
    wait = limiter.take(user.user_id, len(raws))
    if wait > 0:
        raise APIError(429, "too_many_requests",
                       f"rate limit of {settings.ingest_rate_per_second:g} events/s",
                       headers=retry_after(wait))
    clock: Clock = request.app.state.clock
    wall_ms = int(clock() * 1000)
    skew, ttl = settings.max_clock_skew_seconds, settings.events_ttl_days
    oldest_ms, newest_ms = ts_bounds(wall_ms, skew, ttl)
    messages: list[tuple[bytes, bytes]] = []
    rejected: list[Rejection] = []
    accept = messages.append
    own_id = None if any_user else user.user_id
    for index, raw in enumerate(raws):
        text = bytes(raw)
        try:
            event = decode_event(text)
        except InvalidEvent as exc:
            rejected.append(Rejection(index, exc.reason))
            continue
        ts_ms = event.ts_ms
        if ts_ms > newest_ms or ts_ms < oldest_ms:
            rejected.append(Rejection(index, ts_reason(ts_ms, wall_ms, skew, ttl)))
        elif own_id is not None and event.user_id != own_id:
            rejected.append(Rejection(
                index, "user_id: a user token may only send its own user_id"))
        else:
            accept((event.user_id.encode(), value_of(text)))
    failure = await run_in_threadpool(producer.send, messages)
    if failure is not None:
        logger.warning("ingest answering 503: %s", failure)
        raise APIError(503, "unavailable", "Kafka did not confirm the events; retry the batch",
                       headers=retry_after(settings.ingest_timeout_seconds))
    return MsgspecResponse(IngestResult(len(messages), rejected), status_code=202)

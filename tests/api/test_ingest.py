"""`POST /v1/events` route by route and status by status (DESIGN §8), with the producer
replaced by a recorder except for the 503 case, which uses a real one facing no broker."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request

from api import create_app, ingest
from api.errors import APIError
from api.ingest import MAX_BODY_BYTES, EventProducer, RateLimiter, read_body, value_of
from api.routes import events as events_routes
from core import auth
from core.clock import ManualClock
from core.settings import Settings
from keypulse.commands import token as token_command
from schemas.events import InvalidEvent, decode_event

Token = Callable[..., str]


class RecordingProducer(EventProducer):
    """Keeps what would go to Kafka and confirms it at once."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sent: list[tuple[bytes, bytes]] = []

    def send(self, messages: list[tuple[bytes, bytes]]) -> str | None:
        self.sent.extend(messages)
        return None


@pytest.fixture
def recorder(app: FastAPI, api_settings: Settings) -> RecordingProducer:
    producer = RecordingProducer(api_settings)
    app.state.event_producer = producer
    return producer


def event(clock: ManualClock, user: str = "user-1", i: int = 0, **changes: Any
          ) -> dict[str, Any]:
    found: dict[str, Any] = {
        "event_id": f"e{i}", "ts": int(clock() * 1000) - 1000, "user_id": user,
        "api_key_id": "k1", "service": "openai", "status_code": 200, "latency_ms": 12.5,
    }
    found.update(changes)
    return found


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def post(client: TestClient, token: str, body: Any, **headers: str) -> Any:
    content = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return client.post("/v1/events", content=content,
                       headers=bearer(token, **{"Content-Type": "application/json", **headers}))


def test_valid_events_are_produced_keyed_by_user_and_answered_202(
        client: TestClient, recorder: RecordingProducer, clock: ManualClock, token: Token) -> None:
    events = [event(clock, i=i) for i in range(3)]
    response = post(client, token("user-1", roles=("user",)), events)
    assert response.status_code == 202
    assert response.json() == {"accepted": 3, "rejected": []}
    assert [key for key, _ in recorder.sent] == [b"user-1"] * 3
    assert [msgspec.json.decode(value) for _, value in recorder.sent] == events


def test_the_value_is_the_sent_json_without_whitespace(
        client: TestClient, recorder: RecordingProducer, clock: ManualClock, token: Token) -> None:
    ts = int(clock() * 1000)
    text = (f'[ {{"event_id": "e1", "ts": {ts}, "user_id": "user-1", "api_key_id": "k", '
            f'"service": "openai", "status_code": 200, "latency_ms": 1.50, "extra": [1, 2]}} ]')
    assert post(client, token(), text.encode()).status_code == 202
    assert recorder.sent == [(b"user-1", (
        f'{{"event_id":"e1","ts":{ts},"user_id":"user-1","api_key_id":"k","service":"openai",'
        f'"status_code":200,"latency_ms":1.50,"extra":[1,2]}}').encode())]


def test_the_events_envelope_is_accepted_too(
        client: TestClient, recorder: RecordingProducer, clock: ManualClock, token: Token) -> None:
    response = post(client, token(), {"events": [event(clock)]})
    assert response.json() == {"accepted": 1, "rejected": []}
    assert len(recorder.sent) == 1


def test_invalid_events_are_rejected_with_the_pipelines_reasons(
        client: TestClient, recorder: RecordingProducer, clock: ManualClock, token: Token) -> None:
    bad = event(clock, i=1, status_code=700)
    with pytest.raises(InvalidEvent) as decoded:
        decode_event(msgspec.json.encode(bad))
    now_ms = int(clock() * 1000)
    events = [event(clock, i=0), bad,
              event(clock, i=2, ts=now_ms + 301_000),  # max_clock_skew_seconds = 300
              event(clock, i=3, ts=now_ms - 31 * 86_400_000),  # events_ttl_days = 30
              event(clock, i=4, ts=now_ms + 299_000),
              "not an event"]
    response = post(client, token(), events)
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 2
    reasons = {item["index"]: item["reason"] for item in body["rejected"]}
    assert sorted(reasons) == [1, 2, 3, 5]
    assert reasons[1] == decoded.value.reason
    assert reasons[2].startswith("ts_in_future: 301000 ms ahead")
    assert reasons[3].startswith("ts_beyond_retention: 31 days old")
    assert [msgspec.json.decode(v)["event_id"] for _, v in recorder.sent] == ["e0", "e4"]


def test_a_user_token_sends_only_its_own_user_id(
        client: TestClient, recorder: RecordingProducer, clock: ManualClock, token: Token) -> None:
    events = [event(clock, "user-1", 0), event(clock, "user-2", 1)]
    for roles in [("user",), ()]:  # a token without roles acts as user
        recorder.sent.clear()
        body = post(client, token("user-1", roles=roles), events).json()
        assert body == {"accepted": 1, "rejected": [
            {"index": 1, "reason": "user_id: a user token may only send its own user_id"}]}
        assert [key for key, _ in recorder.sent] == [b"user-1"]


def test_an_ingest_token_sends_for_any_user(
        client: TestClient, recorder: RecordingProducer, clock: ManualClock, token: Token) -> None:
    events = [event(clock, "user-1", 0), event(clock, "user-2", 1)]
    body = post(client, token("collector", roles=("ingest",)), events).json()
    assert body == {"accepted": 2, "rejected": []}
    assert [key for key, _ in recorder.sent] == [b"user-1", b"user-2"]


def test_gzip_bodies_are_accepted(
        client: TestClient, recorder: RecordingProducer, clock: ManualClock, token: Token) -> None:
    body = gzip.compress(msgspec.json.encode([event(clock)]))
    response = post(client, token(), body, **{"Content-Encoding": "gzip"})
    assert response.json() == {"accepted": 1, "rejected": []}
    assert len(recorder.sent) == 1


def test_no_token_is_401(client: TestClient, recorder: RecordingProducer,
                         clock: ManualClock) -> None:
    response = client.post("/v1/events", json=[event(clock)])
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert recorder.sent == []


@pytest.mark.parametrize("roles", [("analyst",), ("service",), ("admin",)])
def test_other_roles_are_403(client: TestClient, recorder: RecordingProducer,
                             clock: ManualClock, token: Token, roles: tuple[str, ...]) -> None:
    response = post(client, token("user-1", roles=roles), [event(clock)])
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert recorder.sent == []


@pytest.mark.parametrize("body", [b"[{", b"", b"\xff", b"[1,]"])
def test_a_body_that_is_not_json_is_400(client: TestClient, recorder: RecordingProducer,
                                        token: Token, body: bytes) -> None:
    response = post(client, token(), body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_body"


def test_a_broken_gzip_body_is_400(client: TestClient, recorder: RecordingProducer,
                                   clock: ManualClock, token: Token) -> None:
    whole = gzip.compress(msgspec.json.encode([event(clock)]))
    for body in [b"not gzip", whole[: len(whole) // 2]]:
        response = post(client, token(), body, **{"Content-Encoding": "gzip"})
        assert response.status_code == 400
        assert "gzip" in response.json()["error"]["message"]
    assert recorder.sent == []


@pytest.mark.parametrize("body", [{"event": []}, 5, "x", {"events": 3}, None])
def test_json_that_is_not_a_batch_is_422(client: TestClient, recorder: RecordingProducer,
                                         token: Token, body: Any) -> None:
    response = post(client, token(), body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_an_unknown_content_encoding_is_415(client: TestClient, recorder: RecordingProducer,
                                            clock: ManualClock, token: Token) -> None:
    response = post(client, token(), [event(clock)], **{"Content-Encoding": "br"})
    assert response.status_code == 415


def test_more_than_1000_events_is_413(client: TestClient, recorder: RecordingProducer,
                                      token: Token) -> None:
    response = post(client, token(), b"[" + b",".join([b"1"] * 1001) + b"]")
    assert response.status_code == 413
    assert "1001 events" in response.json()["error"]["message"]


def test_a_body_over_1_mib_is_413_by_its_length(client: TestClient, recorder: RecordingProducer,
                                                token: Token) -> None:
    response = post(client, token(), b" " * (MAX_BODY_BYTES + 1))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_a_chunked_body_over_1_mib_is_413(client: TestClient, recorder: RecordingProducer,
                                          token: Token) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    response = client.post("/v1/events", content=chunks(), headers=bearer(token()))
    assert response.status_code == 413


def test_a_gzip_bomb_is_413(client: TestClient, recorder: RecordingProducer,
                            token: Token) -> None:
    bomb = gzip.compress(b"[" + b" " * (8 * MAX_BODY_BYTES) + b"]")
    assert len(bomb) < 64 * 1024
    response = post(client, token(), bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "decompressed" in response.json()["error"]["message"]


def test_the_stream_is_read_no_further_than_the_limit() -> None:
    """Without a Content-Length the reader stops at the first chunk past the limit."""
    received = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # endless

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(APIError) as refused:
        asyncio.run(read_body(request, limit=10_000))
    assert refused.value.status == 413
    assert len(received) == 11


def test_over_the_rate_limit_is_429_with_retry_after(
        api_settings: Settings, clock: ManualClock, token: Token) -> None:
    settings = api_settings.model_copy(update={"ingest_rate_per_second": 100.0,
                                               "ingest_burst": 1000})
    app = create_app(settings, clock=clock)
    recorder = app.state.event_producer = RecordingProducer(settings)
    with TestClient(app) as client:
        batch = [event(clock, i=i) for i in range(600)]
        assert post(client, token(), batch).status_code == 202
        response = post(client, token(), batch)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "2"  # 200 tokens short at 100/s
        assert response.json()["error"]["code"] == "too_many_requests"
        other = post(client, token("user-2"), [event(clock, "user-2")])
        assert other.status_code == 202  # each caller has its own bucket
        clock.advance(2)
        assert post(client, token(), batch).status_code == 202
    assert len(recorder.sent) == 1201


def test_rate_limiter_refills_and_never_exceeds_its_burst() -> None:
    clock = ManualClock()
    limiter = RateLimiter(10.0, 1000, clock)
    assert limiter.take("a", 1000) == 0
    assert limiter.take("a", 10) == pytest.approx(1.0)
    clock.advance(1000)
    assert limiter.take("a", 1000) == 0
    assert limiter.take("a", 1) == pytest.approx(0.1)


def test_kafka_unreachable_is_503_with_retry_after(
        api_settings: Settings, clock: ManualClock, token: Token) -> None:
    settings = api_settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1",
                                               "ingest_timeout_seconds": 0.5})
    app = create_app(settings, clock=clock)
    with TestClient(app) as client:
        response = post(client, token(), [event(clock)])
        assert app.state.event_producer._producer is not None  # made on first use
    assert app.state.event_producer._producer is None  # closed when the app stopped
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "unavailable"


def test_a_batch_the_local_queue_cannot_hold_is_refused_before_any_of_it_is_produced(
        api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka down for long: the queue fills; a batch past its room is refused whole (503),
    never half queued, and at once. (Producing it would have failed at the fourth event, the
    queue's limit, with "cannot produce", after queueing three.)"""
    monkeypatch.setattr(ingest, "MAX_QUEUED", 3)
    producer = EventProducer(api_settings.model_copy(update={
        "kafka_bootstrap": "127.0.0.1:1", "ingest_timeout_seconds": 30.0}))
    try:
        started = time.monotonic()
        failure = producer.send([(b"u", b"{}")] * 4)
        assert failure is not None and "local queue" in failure
        assert time.monotonic() - started < 5
    finally:
        producer.close()


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12), st.sampled_from([None, 2]))
def test_value_of_is_msgspecs_compact_form(document: Any, indent: int | None) -> None:
    """Kept as sent when already compact (a space inside a string included), else formatted:
    either way the same bytes as msgspec.json.format(indent=-1)."""
    text = msgspec.json.encode(document)
    if indent is not None:
        text = msgspec.json.format(text, indent=indent)
    assert value_of(text) == msgspec.json.format(text, indent=-1)


def test_the_route_is_in_openapi() -> None:
    document = get_openapi(title="t", version="1", routes=events_routes.router.routes)
    operation = document["paths"]["/v1/events"]["post"]
    assert set(operation["responses"]) >= {"202", "400", "401", "403", "413", "422", "429", "503"}
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["type"] == "array"
    assert body["maxItems"] == 1000


def test_keypulse_token_accepts_exactly_the_roles() -> None:
    assert token_command.ROLES == auth.ROLES == ("user", "admin", "ingest", "service", "analyst")
    parser = argparse.ArgumentParser()
    token_command.add_arguments(parser)
    args = parser.parse_args(["--user", "u", "--role", "ingest", "--role", "analyst"])
    assert args.roles == ["ingest", "analyst"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--user", "u", "--role", "root"])
    text = parser.format_help()
    assert all(role in text for role in auth.ROLES)
    assert "acts as user" in text


def test_the_time_bounds_are_inclusive_days_and_seconds() -> None:
    from schemas import events

    assert events.ts_bounds(10 * 86_400_000, 300, 3) == (7 * 86_400_000, 10 * 86_400_000 + 300_000)

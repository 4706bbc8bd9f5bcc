"""keypulse.traffic: deterministic, valid, realistic; malformed events fail; incidents bite."""

from __future__ import annotations

import statistics
import uuid
from collections import Counter

import msgspec
import pytest

from keypulse.traffic import (
    CATALOGUE,
    MALFORMED_KINDS,
    SERVICE_NAMES,
    Incident,
    TrafficGenerator,
    generate_bytes,
)
from schemas.events import InvalidEvent, UsageEvent, decode_event

NOW_MS = 1_700_000_000_000
LLM_ENDPOINTS = {(s.name, e.path) for s in CATALOGUE for e in s.endpoints if e.tokens_in_median}

# What decode_event must say for each kind of malformed event (any one substring matches).
EXPECTED_REASONS: dict[str, tuple[str, ...]] = {
    "not-json": ("not valid JSON",),
    "truncated": ("not valid JSON",),
    "missing-field": ("required field missing",),
    "wrong-type": ("got `str`", "got `float`", "got `int`", "got `bool`"),
    "empty-string": ("of length >= 1",),
    "status-out-of-range": ("status_code: expected `int` >= 100",
                            "status_code: expected `int` <= 599"),
    "negative-latency": ("latency_ms: expected `float` >= 0",
                         "latency_ms: expected `float` <= 3600000"),
    "nan-token": ("tokens_in: NaN is not valid JSON", "tokens_in: Infinity is not valid JSON",
                  "tokens_in: -Infinity is not valid JSON"),
    "invalid-utf8": ("user_id: invalid UTF-8 at byte",),
    "oversized-string": ("of length <= ",),
    "bad-service": ("service: expected `str` matching regex",),
    "ts-without-offset": ("ts: RFC 3339 time needs an offset",),
    "ts-out-of-range": ("ts: epoch milliseconds must be in",),
    "oversized-payload": ("exceeds the 65536 byte limit",),
}


def _decode_all(values: list[bytes]) -> list[UsageEvent]:
    return [decode_event(v) for v in values]


def test_same_seed_same_events_different_seed_different_events() -> None:
    a = list(TrafficGenerator(42, 20, malformed=0.1).events(2_000, NOW_MS, step_ms=3))
    b = list(TrafficGenerator(42, 20, malformed=0.1).events(2_000, NOW_MS, step_ms=3))
    c = list(TrafficGenerator(43, 20, malformed=0.1).events(2_000, NOW_MS, step_ms=3))
    assert a == b
    assert a != c
    assert generate_bytes(500, seed=5) == generate_bytes(500, seed=5)


def test_every_valid_event_decodes_and_is_keyed_by_its_user() -> None:
    gen = TrafficGenerator(1, 50)
    pairs = list(gen.events(20_000, NOW_MS, step_ms=1))
    ids = set()
    ts_kinds = Counter()
    for i, (key, value) in enumerate(pairs):
        event = decode_event(value)
        assert key == event.user_id.encode()
        assert event.ts_ms == NOW_MS + i
        ts_kinds[type(msgspec.json.decode(value)["ts"]).__name__] += 1
        parsed = uuid.UUID(event.event_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == event.event_id
        ids.add(event.event_id)
    assert len(ids) == len(pairs)
    assert ts_kinds == {"int": 10_000, "str": 10_000}  # epoch ms and RFC 3339, alternately


@pytest.mark.parametrize("ts_format", ["ms", "rfc3339"])
def test_ts_format_can_be_pinned(ts_format: str) -> None:
    gen = TrafficGenerator(3, 5, ts_format=ts_format)  # type: ignore[arg-type]
    kinds = {type(msgspec.json.decode(v)["ts"]) for _, v in gen.events(100, NOW_MS + 999)}
    assert kinds == ({int} if ts_format == "ms" else {str})
    assert all(decode_event(v).ts_ms == NOW_MS + 999 for _, v in gen.events(10, NOW_MS + 999))


def test_traffic_looks_like_real_usage() -> None:
    gen = TrafficGenerator(7, 50)
    events = _decode_all([v for _, v in gen.events(50_000, NOW_MS)])
    statuses = Counter(e.status_code // 100 for e in events)
    assert statuses[2] / len(events) > 0.9
    assert 0.01 < statuses[4] / len(events) < 0.08
    assert 0.0005 < statuses[5] / len(events) < 0.03
    codes = Counter(e.status_code for e in events)
    assert {401, 404, 429, 500, 503} <= set(codes)

    assert {e.service for e in events} <= set(SERVICE_NAMES)
    assert len({e.user_id for e in events}) == 50
    busiest = Counter(e.user_id for e in events).most_common()
    assert busiest[0][1] > 5 * busiest[-1][1]  # a few heavy users, a long tail

    for user in gen.users:
        assert 1 <= len(user.services) <= 5
        assert all(1 <= len(user.api_keys[s]) <= 3 for s in user.services)

    for e in events:
        assert e.endpoint and e.method and e.region and e.sdk
        assert e.request_bytes is not None and e.response_bytes is not None
        if e.status_code >= 400:
            assert e.error_type
        if (e.service, e.endpoint) in LLM_ENDPOINTS:
            assert e.tokens_in is not None and e.tokens_in > 0
            assert e.tokens_out is not None and e.cost_usd is not None
        else:
            assert e.tokens_in is None

    chat = [e.latency_ms for e in events
            if e.endpoint == "/v1/chat/completions" and e.service == "openai" and e.is_success]
    embed = [e.latency_ms for e in events
             if e.endpoint == "/v1/embeddings" and e.service == "openai" and e.is_success]
    assert statistics.median(chat) > 3 * statistics.median(embed)
    # log-normal: a long right tail
    assert statistics.quantiles(chat, n=100)[98] > 2 * statistics.median(chat)


def test_services_can_be_restricted() -> None:
    gen = TrafficGenerator(2, 10, ["stripe", "openai"])
    assert {decode_event(v).service for _, v in gen.events(2_000, NOW_MS)} == {"stripe", "openai"}
    with pytest.raises(ValueError, match="unknown service"):
        TrafficGenerator(2, 10, ["nope"])
    with pytest.raises(ValueError, match="malformed"):
        TrafficGenerator(2, 10, malformed=1.5)


def test_malformed_events_fail_with_their_reason() -> None:
    gen = TrafficGenerator(9, 20, malformed=1.0)
    seen: Counter[str] = Counter()
    for key, value, kind in gen.labeled_events(3_000, NOW_MS):
        assert kind is not None
        assert key.startswith(b"usr_")
        with pytest.raises(InvalidEvent) as caught:
            decode_event(value)
        reason = caught.value.reason
        assert any(part in reason for part in EXPECTED_REASONS[kind]), (kind, reason, value[:120])
        seen[kind] += 1
    assert set(seen) == set(MALFORMED_KINDS)


def test_malformed_share_is_respected() -> None:
    gen = TrafficGenerator(4, 20, malformed=0.1)
    kinds = [kind for _, _, kind in gen.labeled_events(20_000, NOW_MS)]
    share = sum(k is not None for k in kinds) / len(kinds)
    assert 0.09 < share < 0.11


def _rates(events: list[UsageEvent], user: str, service: str) -> tuple[float, float, float, float]:
    """(error rate, median latency) inside and outside the (user, service) pair."""
    inside = [e for e in events if e.user_id == user and e.service == service]
    outside = [e for e in events if not (e.user_id == user and e.service == service)]

    def err(es: list[UsageEvent]) -> float:
        return sum(e.status_code >= 500 for e in es) / len(es)

    def med(es: list[UsageEvent]) -> float:
        return statistics.median(e.latency_ms for e in es)

    return err(inside), med(inside), err(outside), med(outside)


def test_error_burst_hits_only_its_user_and_service_during_its_window() -> None:
    base = TrafficGenerator(11, 30)
    user, service = base.default_incident_target()
    start, end = NOW_MS + 10_000, NOW_MS + 20_000
    gen = TrafficGenerator(11, 30, incidents=[Incident("error-burst", user, service, start, end)])
    events = _decode_all([v for _, v in gen.events(30_000, NOW_MS, step_ms=1)])
    during = [e for e in events if start <= e.ts_ms < end]
    before = [e for e in events if e.ts_ms < start]
    after = [e for e in events if e.ts_ms >= end]

    err_in, _, err_out, _ = _rates(during, user, service)
    assert err_in > 0.3
    assert err_out < 0.05
    for quiet in (before, after):
        assert _rates(quiet, user, service)[0] < 0.05


def test_latency_spike_hits_only_its_user_and_service() -> None:
    base = TrafficGenerator(12, 30)
    user, service = base.default_incident_target()
    gen = TrafficGenerator(12, 30, incidents=[
        Incident("latency-spike", user, service, NOW_MS, NOW_MS + 60_000)])
    events = _decode_all([v for _, v in gen.events(20_000, NOW_MS)])
    normal = _decode_all([v for _, v in base.events(20_000, NOW_MS)])
    _, med_in, err_out, med_out = _rates(events, user, service)
    _, base_in, _, base_out = _rates(normal, user, service)
    assert med_in > 5 * base_in
    assert 0.8 < med_out / base_out < 1.25
    assert err_out < 0.05


def test_incident_target_must_exist() -> None:
    gen = TrafficGenerator(1, 5)
    with pytest.raises(ValueError, match="not a generated user"):
        gen.add_incident(Incident("error-burst", "usr_nobody", "openai", 0, 1))
    user = gen.users[0]
    other = next(s for s in SERVICE_NAMES if s not in user.services)
    with pytest.raises(ValueError, match="does not use"):
        gen.add_incident(Incident("error-burst", user.user_id, other, 0, 1))

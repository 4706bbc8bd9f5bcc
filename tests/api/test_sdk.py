"""keypulse.sdk against the real endpoint (the API under uvicorn on a free port) and the real
broker: what `track()` queued is on `usage.events`, once each, keyed by user_id; a 429's
Retry-After is waited for; rejected events are counted, not retried; a full queue drops its
oldest events; a dead endpoint never reaches the caller; and a broker stopped mid-run (a second
broker of our own, stopped and started again) loses nothing."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import msgspec
import pytest

from api import create_app
from core.auth import mint_token
from core.clock import Clock, ManualClock, system_clock
from core.settings import Settings
from infra.kafka import launcher
from keypulse.sdk import Client, _seconds
from schemas.events import InvalidEvent
from tests.api.live import LiveServer, read_topic
from tests.integration.harness import free_port


def serve(settings: Settings, clock: Clock = system_clock) -> LiveServer:
    return LiveServer(create_app(settings, clock=clock))


@pytest.fixture
def api(kafka_settings: Settings) -> Iterator[LiveServer]:
    with serve(kafka_settings) as server:
        yield server


@pytest.fixture
def ingest_token(kafka_settings: Settings) -> str:
    return mint_token(kafka_settings, "collector", roles=("ingest",))


def _on_topic(settings: Settings) -> list[tuple[bytes | None, str]]:
    """(key, event_id) of every message now on usage.events."""
    return [(key, msgspec.json.decode(value or b"")["event_id"])
            for key, value in read_topic(settings)]


def _track(client: Client, n: int, users: int = 7) -> dict[str, str]:
    """n events from `users` users; {event_id: user_id}."""
    tracked: dict[str, str] = {}
    for i in range(n):
        user = f"user-{i % users}"
        event_id = client.track(user_id=user, api_key_id="k1", service="openai",
                                status_code=200 if i % 5 else 503, latency_ms=i % 300 + 0.5,
                                endpoint="/v1/chat", tokens_in=i, cost_usd=0.001)
        assert event_id is not None
        tracked[event_id] = user
    return tracked


# -- delivery to the real endpoint and broker --------------------------------------------------

def test_tracked_events_reach_the_topic_once_each_keyed_by_user(
        kafka_settings: Settings, api: LiveServer, ingest_token: str) -> None:
    with Client(api.url, ingest_token, flush_interval=0.05) as client:
        tracked = _track(client, 1234)
        assert client.flush(timeout=30)
        stats = client.stats
    assert (stats.tracked, stats.delivered, stats.pending) == (1234, 1234, 0)
    assert (stats.rejected, stats.failed, stats.dropped, stats.retries) == (0, 0, 0, 0)
    found = _on_topic(kafka_settings)
    assert Counter(event_id for _, event_id in found) == Counter(list(tracked))  # once each
    assert all(key == tracked[event_id].encode() for key, event_id in found)
    assert all(uuid.UUID(event_id).version == 4 for event_id in tracked)


def test_close_sends_what_is_queued(kafka_settings: Settings, api: LiveServer,
                                    ingest_token: str) -> None:
    with Client(api.url, ingest_token, flush_interval=3600) as client:
        tracked = _track(client, 40)  # fewer than a batch, long before the interval
        assert client.stats.pending == 40
    assert client.stats.delivered == 40
    assert {event_id for _, event_id in _on_topic(kafka_settings)} == set(tracked)
    assert client.track(user_id="u", api_key_id="k", service="s", status_code=200,
                        latency_ms=1) is None  # after close: dropped and counted, not raised
    assert (client.stats.dropped, client.stats.tracked) == (1, 41)


def test_the_endpoints_rejections_are_counted_and_not_retried(
        kafka_settings: Settings, api: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    token = mint_token(kafka_settings, "user-1", roles=("user",))
    with caplog.at_level(logging.WARNING, logger="keypulse.sdk"), \
            Client(api.url, token, flush_interval=3600) as client:
        own = client.track(user_id="user-1", api_key_id="k", service="s", status_code=200,
                           latency_ms=1)
        other = client.track(user_id="user-2", api_key_id="k", service="s", status_code=200,
                             latency_ms=1)
        old = client.track(user_id="user-1", api_key_id="k", service="s", status_code=200,
                           latency_ms=1, ts=time.time() * 1000 - 400 * 86_400_000)
        assert client.flush(timeout=30)
        stats = client.stats
    assert (stats.delivered, stats.rejected, stats.retries, stats.failed) == (1, 2, 0, 0)
    assert [event_id for _, event_id in _on_topic(kafka_settings)] == [own]
    text = caplog.text
    assert f"{other}: user_id: a user token may only send its own user_id" in text
    assert f"{old}: ts_beyond_retention" in text
    assert token not in text


def test_a_refused_token_fails_the_batch_without_retrying(
        kafka_settings: Settings, api: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    bad = mint_token(kafka_settings, "user-1", roles=("user",), ttl_seconds=60,
                     clock=ManualClock(time.time() - 3600))  # expired an hour ago
    with caplog.at_level(logging.WARNING, logger="keypulse.sdk"), \
            Client(api.url, bad, flush_interval=3600) as client:
        _track(client, 3)
        assert client.flush(timeout=30)
        stats = client.stats
    assert (stats.failed, stats.delivered, stats.retries) == (3, 0, 0)
    assert "HTTP 401" in caplog.text
    assert bad not in caplog.text


class _PausableClock:
    """Wall time that stands still while paused and then goes on from where it stopped."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.paused_at: float | None = None

    def __call__(self) -> float:
        return self.paused_at if self.paused_at is not None else time.time() - self.offset

    def pause(self) -> None:
        self.paused_at = self()

    def resume(self) -> None:
        assert self.paused_at is not None
        self.offset, self.paused_at = time.time() - self.paused_at, None


def test_a_429_is_retried_no_sooner_than_its_retry_after(kafka_settings: Settings,
                                                         ingest_token: str) -> None:
    # 500 events/s with a burst of 1,000. The first 1,000 events are sent while the API's clock
    # stands still, so they empty the bucket; the next batch of 500 meets a 429 with
    # Retry-After: 1, and one second later the bucket holds enough for it. A client that
    # retried sooner (its own backoff here is ~10 ms) would meet more 429s.
    limited = kafka_settings.model_copy(update={"ingest_rate_per_second": 500.0,
                                                "ingest_burst": 1000})
    clock = _PausableClock()
    with serve(limited, clock) as api, Client(api.url, ingest_token, flush_interval=3600,
                                                backoff_base=0.01) as client:
        clock.pause()
        tracked = _track(client, 1000)
        assert client.flush(timeout=30)
        assert client.stats.retries == 0
        clock.resume()
        started = time.monotonic()
        tracked |= _track(client, 500)
        assert client.flush(timeout=30)
        elapsed = time.monotonic() - started
        stats = client.stats
    assert stats.retries == 1
    assert elapsed >= 1.0
    assert (stats.delivered, stats.failed) == (1500, 0)
    assert Counter(event_id for _, event_id in _on_topic(kafka_settings)) == Counter(list(tracked))


def test_a_full_queue_drops_its_oldest_events_and_counts_them(
        kafka_settings: Settings, api: LiveServer, ingest_token: str) -> None:
    with Client(api.url, ingest_token, max_queue=10, flush_interval=3600) as client:
        ids = list(_track(client, 25))
        assert (client.stats.dropped, client.stats.pending) == (15, 10)
        assert client.flush(timeout=30)
        assert client.stats.delivered == 10
    assert sorted(event_id for _, event_id in _on_topic(kafka_settings)) == sorted(ids[15:])


def test_straight_to_kafka_keyed_by_user(kafka_settings: Settings) -> None:
    with Client(kafka=kafka_settings, flush_interval=0.05) as client:
        with pytest.raises(InvalidEvent, match="ts_beyond_retention"):  # no endpoint to ask
            client.track(user_id="u", api_key_id="k", service="s", status_code=200,
                         latency_ms=1, ts=time.time() * 1000 - 400 * 86_400_000)
        tracked = _track(client, 300)
        assert client.flush(timeout=30)
        assert (client.stats.delivered, client.stats.failed) == (300, 0)
    found = _on_topic(kafka_settings)
    assert Counter(event_id for _, event_id in found) == Counter(list(tracked))
    assert all(key == tracked[event_id].encode() for key, event_id in found)


# -- a dead endpoint, and the caller's own mistakes (no broker) ---------------------------------

def test_track_never_raises_nor_blocks_while_the_endpoint_is_down(
        caplog: pytest.LogCaptureFixture) -> None:
    token = "secret-token-" + uuid.uuid4().hex
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    with caplog.at_level(logging.DEBUG, logger="keypulse.sdk"):
        client = Client(url, token, max_queue=1000, flush_interval=0.01, backoff_base=0.01,
                        backoff_max=0.05)
        slowest = 0.0
        for i in range(5000):
            started = time.perf_counter()
            client.track(user_id=f"u{i % 3}", api_key_id="k", service="s", status_code=200,
                         latency_ms=1.0)
            slowest = max(slowest, time.perf_counter() - started)
        assert not client.flush(timeout=0.3)
        before = client.stats
        started = time.monotonic()
        assert not client.close(timeout=0.3)
        closing = time.monotonic() - started
    after = client.stats
    assert slowest < 0.5  # no network on the caller's path (typically ~20 µs)
    assert before.retries >= 2 and before.delivered == 0
    assert before.dropped + before.pending == 5000
    assert closing < 5
    assert after.pending == 0 and after.failed == before.pending  # given up at close, counted
    assert after.tracked == after.delivered + after.rejected + after.failed + after.dropped
    assert "ConnectionRefusedError" in caplog.text
    assert token not in caplog.text


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert _seconds("3") == 3.0
    assert 118 < _seconds(formatdate(time.time() + 120, usegmt=True)) <= 120
    assert _seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past
    assert _seconds(None) == _seconds("soon") == 0.0


def test_an_invalid_event_raises_at_the_call_site_unless_not_strict() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "t", flush_interval=3600) as client:
        with pytest.raises(InvalidEvent, match=r"status_code: expected `int` >= 100"):
            client.track(user_id="u", api_key_id="k", service="s", status_code=42,
                         latency_ms=1.0)
        with pytest.raises(InvalidEvent, match=r"service: expected `str` matching regex"):
            client.track(user_id="u", api_key_id="k", service="Not A Service",
                         status_code=200, latency_ms=1.0)
        with pytest.raises(TypeError, match="colour"):
            client.track(user_id="u", api_key_id="k", service="s", status_code=200,
                         latency_ms=1.0, colour="red")
        assert client.stats.tracked == 0
    with Client(url, "t", flush_interval=3600, strict=False) as lenient:
        assert lenient.track(user_id="u", api_key_id="k", service="s", status_code=200,
                             latency_ms=float("nan")) is None
        assert (lenient.stats.invalid, lenient.stats.tracked) == (1, 0)


# -- a broker outage -----------------------------------------------------------------------------

@pytest.mark.slow  # two broker starts: ~35 s on an idle 2-core machine, ~70 s on a busy one
def test_a_broker_outage_loses_nothing(kafka_settings: Settings, tmp_path: Path,
                                       ingest_token: str) -> None:
    """A broker of the test's own (its data in tmp_path) is stopped mid-run and started again:
    the API answers 503, the client keeps its events and retries, and once the broker is back
    every event is on the topic. A retried batch may land twice (Kafka took it but the API's
    confirmation timed out): the copy is the same event, same event_id, which the pipeline's
    dedup drops; the test logs how many there were."""
    own = kafka_settings.model_copy(update={
        "kafka_bootstrap": f"127.0.0.1:{free_port()}", "kafka_controller_port": free_port(),
        "data_dir": tmp_path, "kafka_heap_mb": 256, "topic_partitions": 1,
        "ingest_timeout_seconds": 1.0})
    launcher.start(own, wait_seconds=120)
    try:
        with serve(own) as api, Client(api.url, ingest_token, flush_interval=0.05,
                                         backoff_base=0.1, backoff_max=1.0) as client:
            tracked = _track(client, 100)
            assert client.flush(timeout=30)
            launcher.stop(own)
            tracked |= _track(client, 300)
            assert not client.flush(timeout=2)  # 503s: kept, retried
            during = client.stats
            launcher.start(own, wait_seconds=120)
            assert client.flush(timeout=60)
            after = client.stats
        messages = read_topic(own)
    finally:
        launcher.stop(own)
    assert (during.delivered, during.pending, during.dropped) == (100, 300, 0)
    assert during.retries >= 1
    assert (after.delivered, after.failed, after.dropped, after.pending) == (400, 0, 0, 0)
    copies: dict[str, set[tuple[bytes | None, bytes | None]]] = {}
    for key, value in messages:
        copies.setdefault(msgspec.json.decode(value or b"")["event_id"], set()).add((key, value))
    assert copies.keys() == tracked.keys()  # nothing lost
    assert all(len(same) == 1 for same in copies.values())  # a duplicate is the same message
    logging.getLogger(__name__).info("outage: %d retries, %d duplicates on the topic",
                                     after.retries, len(messages) - len(copies))

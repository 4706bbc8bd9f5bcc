"""The live tier (DESIGN §9, ws_bridge/live.py): provisional stats of the open window.

Units drive `LiveTier` with a ManualClock (fold on "the Kafka thread", collect and deliver on
"the loop" called by hand); the integration tests run a bridge against the real broker and
check what a socket receives: provisional frames for its own user only, within about a
second of the events, at most one per second per service, duplicates counted once, and the
final record replacing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from core import sketch
from core.clock import ManualClock
from core.limits import TokenBucket
from core.settings import Settings, load
from schemas.stats import StatsRecord
from schemas.ws import StatsUpdate, decode_server_frame
from tests.ws import kafka_helpers as kh
from tests.ws.harness import expect, login, quiet, recv, send
from ws_bridge.connection import ALERTS, STATS, Connection
from ws_bridge.live import LIVE_DESCRIBED, MAX_IDS, RAW_MAX, LiveTier
from ws_bridge.registry import Registry
from ws_bridge.router import Kind, Router
from ws_bridge.stats import BridgeStats

_enc = msgspec.json.Encoder()
NOW = 1_700_000_003.0  # 3 s into a 10 s window (1_700_000_000 is a multiple of 10)


def event(user: str = "alice", *, service: str = "openai", ts: int | str | None = None,
          status: int = 200, latency: float = 5.0, event_id: str | None = None,
          **extra: Any) -> bytes:
    return _enc.encode({
        "event_id": event_id or uuid.uuid4().hex, "ts": int(NOW * 1000) if ts is None else ts,
        "user_id": user, "api_key_id": "k1", "service": service, "status_code": status,
        "latency_ms": latency, "endpoint": "/v1/chat", **extra})


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class FakeConn:
    """What `LiveTier.deliver` touches on a connection: its channels and the stats path."""

    def __init__(self, channels: int = STATS) -> None:
        self.channels = channels
        self.offered: list[tuple[str, tuple[str, int]]] = []
        self.writes = 0  # socket writes: an unbatched offer, or a flush

    def offer_stats(self, prefix: str, key: tuple[str, int], *, flush: bool = True) -> None:
        self.offered.append((prefix, key))
        self.writes += flush

    def flush(self) -> None:
        self.writes += 1

    def write_stats(self, prefixes: list[str]) -> bool:
        """The direct path (nothing queued here): each frame, keyed as offered, one write."""
        for prefix in prefixes:
            update = decode_server_frame(f'{prefix}"seq":1}}')[1]
            self.offered.append((prefix, (update.service, int(update.window_start.timestamp()))))
        self.writes += 1
        return True

    def updates(self) -> list[StatsUpdate]:
        return [decode_server_frame(f'{prefix}"seq":1}}')[1] for prefix, _ in self.offered]


def tier(*users: str, **options: Any) -> tuple[LiveTier, ManualClock, dict[str, FakeConn]]:
    settings = load(dev=True, window_seconds=10, allowed_lateness_seconds=5,
                    kafka_bootstrap="127.0.0.1:1")
    registry = Registry(max_per_user=5, alerts_topic="a", notifications_topic="n",
                        apikeys_topic="k")
    conns = {}
    for user in users:
        conns[user] = FakeConn()
        registry.by_user[user] = [conns[user]]  # type: ignore[list-item]
        registry.stats_keys.add(user.encode())
    clock = ManualClock(NOW)
    return LiveTier(settings, registry, clock, **options), clock, conns


def emit(live: LiveTier, clock: ManualClock) -> int:
    """One tick on the tick grid, as the loop timer runs it: the frames delivered."""
    now = math.floor(clock() / live.tick) * live.tick
    due = live.collect(now)
    for item in due:
        live.deliver(item, int(clock() * 1000))
    return len(due)


def emit_by_user(live: LiveTier, clock: ManualClock) -> int:
    """`emit`, a user's frames written together (one write per connection), as the timer
    does: the frames delivered."""
    now = math.floor(clock() / live.tick) * live.tick
    by_user: dict[str, list[Any]] = {}
    for item in live.collect(now):
        by_user.setdefault(item.series.user_id, []).append(item)
    for items in by_user.values():
        live.deliver_user(items, int(clock() * 1000))
    return sum(map(len, by_user.values()))


# -- units ------------------------------------------------------------------------------


def test_counts_rates_and_exact_percentiles_of_a_window() -> None:
    live, clock, conns = tier("alice")
    latencies = [float(i) for i in range(1, 101)]
    random.shuffle(latencies)
    statuses = [200] * 90 + [404] * 6 + [503] * 4
    live.fold([(b"alice", event(status=s, latency=lat, tokens_in=3, tokens_out=2,
                                cost_usd=0.01))
               for s, lat in zip(statuses, latencies, strict=True)])
    assert emit(live, clock) == 1
    (update,) = conns["alice"].updates()
    assert update.final is False and update.deduplicated is True
    assert (update.requests, update.successes, update.client_errors,
            update.server_errors) == (100, 90, 6, 4)
    assert update.success_rate == 0.9 and update.error_rate == 0.1
    assert update.server_error_rate == 0.04
    assert (update.latency_p50_ms, update.latency_p95_ms, update.latency_p99_ms,
            update.latency_max_ms) == (50.0, 95.0, 99.0, 100.0)
    assert update.latency_avg_ms == pytest.approx(50.5)
    assert (update.tokens_in, update.tokens_out) == (300, 200)
    assert update.cost_usd == pytest.approx(1.0)
    assert update.window_start.timestamp() == NOW - 3 and update.window_seconds == 10
    assert update.as_of is not None and update.as_of.timestamp() == NOW
    assert conns["alice"].offered[0][1] == ("openai", int(NOW - 3))  # the final's coalesce key


def test_at_most_one_frame_per_second_per_service() -> None:
    live, clock, conns = tier("alice")
    frames_at: dict[str, list[float]] = {"openai": [], "anthropic": []}
    for _ in range(40):  # 10 s of ticks, events for both services before each
        live.fold([(b"alice", event(service=s, ts=int(clock() * 1000)))
                   for s in ("openai", "anthropic")])
        before = len(conns["alice"].offered)
        emit(live, clock)
        for _, (service, _) in conns["alice"].offered[before:]:
            frames_at[service].append(clock())
        clock.advance(0.25)
    for times in frames_at.values():  # an update may hold two windows at a boundary
        updates = sorted(set(times))
        gaps = [b - a for a, b in itertools.pairwise(updates)]
        assert len(updates) >= 9
        assert min(gaps) >= 1.0 - 1e-9


def test_a_users_services_share_the_rhythm_and_one_write() -> None:
    """A user's services whose last update is as old go along with the due one (their
    rhythm becomes the user's, still at most one frame per second per service), and one
    update reaches each connection in one write."""
    live, clock, conns = tier("alice")
    live.fold([(b"alice", event(service="openai")), (b"alice", event(service="anthropic"))])
    assert emit(live, clock) == 2
    clock.advance(0.5)
    live.fold([(b"alice", event(service="anthropic", ts=int(clock() * 1000)))])
    assert emit(live, clock) == 0  # not a second yet
    clock.advance(0.5)
    live.fold([(b"alice", event(service="openai", ts=int(clock() * 1000)))])
    due = live.collect(math.floor(clock() / live.tick) * live.tick)
    assert sorted(d.series.service for d in due) == ["anthropic", "openai"]
    conn = conns["alice"]
    writes = conn.writes
    live.deliver_user(due, int(clock() * 1000))
    assert conn.writes == writes + 1
    assert {(u.service, u.requests) for u in conn.updates()[-2:]} == {("anthropic", 2),
                                                                    ("openai", 2)}


def test_duplicates_count_once_and_the_bound_is_said() -> None:
    live, clock, conns = tier("alice")
    ids = [uuid.uuid4().hex for _ in range(20)]
    live.fold([(b"alice", event(event_id=i)) for i in ids + ids[:5]])
    emit(live, clock)
    assert conns["alice"].updates()[-1].requests == 20
    assert live.duplicates == 5
    big, clock2, conns2 = tier("bob")
    big.fold([(b"bob", event("bob", event_id=str(i))) for i in range(MAX_IDS + 10)])
    big.fold([(b"bob", event("bob", event_id="1"))])  # remembered: still a duplicate
    emit(big, clock2)
    update = conns2["bob"].updates()[-1]
    assert update.requests == MAX_IDS + 10 and update.deduplicated is False
    assert big.duplicates == 1


def test_junk_and_foreign_events_are_skipped_and_counted() -> None:
    live, clock, conns = tier("alice")
    live.fold([
        (b"alice", b"not json"),
        (b"alice", b'{"event_id": "x"}'),
        (b"alice", b""),
        (b"alice", event(status=700)),
        (b"alice", event(latency=-1)),
        (b"alice", event(service="Not A Service")),
        (b"alice", event("mallory")),  # the key says alice, the value mallory
        (b"alice", event(ts="2024-05-01T00:00:00")),  # no offset
        (b"alice", event(ts=int(NOW * 1000) + 3_600_000)),  # far ahead of the clock
        (b"alice", event()),
    ])
    assert live.invalid == 9 and live.events == 1
    emit(live, clock)
    assert [u.requests for u in conns["alice"].updates()] == [1]


def test_rfc3339_ts_and_late_events() -> None:
    live, clock, conns = tier("alice")
    live.fold([(b"alice", event(ts="2023-11-14T22:13:23+00:00")),  # NOW as RFC 3339
               (b"alice", event(ts=int(NOW * 1000) - 3_600_000))])  # an hour old: gone
    assert (live.events, live.late) == (1, 1)
    emit(live, clock)
    assert conns["alice"].updates()[0].window_start.timestamp() == NOW - 3


def test_final_record_replaces_and_late_events_stay_out() -> None:
    live, clock, conns = tier("alice")
    live.fold([(b"alice", event())])
    emit(live, clock)
    live.fold([(b"alice", event())])
    live.finalize([("alice", "openai", int(NOW - 3))])
    assert live.accumulators == 0 and live.ids == 0
    clock.advance(1)
    live.fold([(b"alice", event())])  # late, after the final: not counted
    assert emit(live, clock) == 0 and live.late == 1
    assert len(conns["alice"].offered) == 1
    # a frame taken before the final passed is not sent after it
    clock.advance(1)
    live.fold([(b"alice", event(ts=int(clock() * 1000) + 10_000))])  # the next window
    due = live.collect(math.floor(clock() / live.tick) * live.tick)
    live.finalize([("alice", "openai", int(NOW + 7))])
    for item in due:
        live.deliver(item, 0)
    assert len(conns["alice"].offered) == 1


def final_prefix(user: str, service: str, window_s: int, requests: int) -> str:
    """A final frame's prefix, as the router prepares it for a record of this window."""
    start = datetime.fromtimestamp(window_s, tz=UTC)
    record = msgspec.structs.replace(
        msgspec.json.decode(kh.stats(user, service, requests=requests), type=StatsRecord),
        window_start=start, window_end=datetime.fromtimestamp(window_s + 10, tz=UTC))
    return f'{{"event":"usage_stats_update","data":{_enc.encode(record)[:-1].decode()},' \
           '"final":true},"ts":1,'


def test_final_frames_wait_for_the_next_update_and_go_first_in_its_write() -> None:
    live, clock, conns = tier("alice")
    live.max_services = 1
    live.fold([(b"alice", event(ts=int(clock() * 1000) - 5000))])  # the previous window
    emit_by_user(live, clock)  # its provisional frame
    writes = conns["alice"].writes
    live.fold([(b"alice", event(ts=int(clock() * 1000) + 2000))])  # this window
    previous = int(NOW - 3) - 10
    left = live.close([
        ("alice", "openai", previous, final_prefix("alice", "openai", previous, 1)),
        ("alice", "openai", previous, final_prefix("alice", "openai", previous, 2)),  # again
        ("alice", "mistral", previous, "x")])  # past the service bound: the caller sends it
    assert left == [2] and live.overflow == 1
    assert emit_by_user(live, clock) == 0  # not due yet: at most one update a second
    assert conns["alice"].writes == writes
    clock.advance(1)
    emit_by_user(live, clock)
    assert conns["alice"].writes == writes + 1  # the final and the provisional: one write
    final, provisional = conns["alice"].offered[-2:]
    assert final[0] == final_prefix("alice", "openai", previous, 2)  # the newest record
    assert final[1] == ("openai", previous)
    assert provisional[1] == ("openai", int(NOW - 3))
    live.fold([(b"alice", event(ts=int(clock() * 1000) - 8000))])  # late, in the final window
    clock.advance(1)
    assert emit_by_user(live, clock) == 0 and live.late == 1  # no provisional frame after the final


def test_a_final_alone_goes_out_within_the_interval() -> None:
    live, clock, conns = tier("alice")
    window = int(NOW - 3)
    assert live.close([("alice", "openai", window, final_prefix("alice", "openai", window, 0))
                       ]) == []
    emit_by_user(live, clock)  # a series never sent: due at once
    assert len(conns["alice"].offered) == 1 and conns["alice"].writes == 1
    assert conns["alice"].offered[0][1] == ("openai", window)


def test_both_windows_in_one_update_around_a_boundary() -> None:
    live, clock, conns = tier("alice")
    live.fold([(b"alice", event(ts=int(NOW * 1000) - 5000)),  # the previous window
               (b"alice", event(ts=int(NOW * 1000)))])
    emit(live, clock)
    assert [u.window_start.timestamp() for u in conns["alice"].updates()] == [NOW - 13, NOW - 3]
    clock.advance(0.5)
    live.fold([(b"alice", event(ts=int(NOW * 1000) - 5000))])
    assert emit(live, clock) == 0  # not a second yet
    clock.advance(0.5)
    assert emit(live, clock) == 1
    assert conns["alice"].updates()[-1].window_start.timestamp() == NOW - 13


def test_state_is_dropped_for_unwatched_users_and_expired_windows() -> None:
    live, clock, _conns = tier("alice", "bob")
    live.fold([(b"alice", event()), (b"bob", event("bob"))])
    assert live.accumulators == 2
    live.registry.stats_keys.discard(b"bob")  # bob unsubscribed from stats
    clock.advance(1)
    emit(live, clock)
    assert live.accumulators == 1 and live.ids == 1
    clock.advance(10 + 5 + 10)  # past window + lateness + margin
    emit(live, clock)
    assert live.accumulators == 0 and live.ids == 0
    clock.advance(2)
    emit(live, clock)
    assert not live._users


def test_the_registry_keeps_the_stats_keys() -> None:
    """Who the feed hands over: users with at least one `stats` subscriber."""
    registry = Registry(max_per_user=5, alerts_topic="a", notifications_topic="n",
                        apikeys_topic="k")
    clock = ManualClock()

    def connection(user: str) -> Connection:
        return Connection(object(), uuid.uuid4().hex, user, (), max_queue=8,  # type: ignore[arg-type]
                          bucket=TokenBucket(1, 1, clock), usage_bucket=TokenBucket(1, 1, clock),
                          stats=BridgeStats(), writer=object())  # type: ignore[arg-type]

    first, second = connection("alice"), connection("alice")
    assert registry.add(first) and registry.add(second)
    assert registry.stats_keys == {b"alice"}  # stats is a default channel
    registry.set_channels(first, ALERTS)
    assert registry.stats_keys == {b"alice"}  # the other one still watches
    registry.set_channels(second, ALERTS | STATS)
    registry.remove(second)
    assert registry.stats_keys == set()
    registry.set_channels(first, ALERTS | STATS)
    assert registry.stats_keys == {b"alice"}
    registry.remove(first)
    assert registry.stats_keys == set() and registry.user_keys == set()


def test_frames_only_for_stats_connections() -> None:
    live, clock, conns = tier("alice")
    other = FakeConn(channels=ALERTS)
    live.registry.by_user["alice"].append(other)  # type: ignore[arg-type]
    live.fold([(b"alice", event())])
    emit(live, clock)
    assert len(conns["alice"].offered) == 1 and not other.offered


def test_bounds_on_services_and_windows() -> None:
    live, _clock, _ = tier("alice")
    live.max_services = 3
    live.fold([(b"alice", event(service=f"svc{i}")) for i in range(5)])
    assert live.overflow == 2
    live.fold([(b"alice", event(service="svc0", ts=int(NOW * 1000) + 10_000 * i))
               for i in range(12)])
    assert live.accumulators == 3 + 7  # svc0 holds MAX_WINDOWS (8)
    assert live.overflow == 2 + 4


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop],
                         ids=["asyncio", "uvloop"])
def test_the_timer_survives_a_stalled_loop(new_loop: Any) -> None:
    """After a stall longer than a tick, the next tick is due at once (uvloop answers such a
    call_at with a plain Handle, which has no `when()`); the timer must carry on."""
    live, clock, conns = tier("alice")
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        live.start(loop)
        live.fold([(b"alice", event())])
        time.sleep(live.tick * 2.5)  # the loop is stalled (not a time window: the loop's)
        await asyncio.sleep(live.tick * 2)
        clock.advance(1)
        live.fold([(b"alice", event())])
        await asyncio.sleep(live.tick * 2)
        live.stop()

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert not errors  # a failing callback would end the timer: no more frames
    assert [u.requests for u in conns["alice"].updates()] == [1, 2]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=60_000, allow_nan=False),
                min_size=RAW_MAX + 1, max_size=3 * RAW_MAX))
def test_sketch_percentiles_within_its_accuracy(latencies: list[float]) -> None:
    live, clock, conns = tier("alice")
    live.fold([(b"alice", event(latency=lat)) for lat in latencies])
    emit(live, clock)
    update = conns["alice"].updates()[-1]
    for q, got in ((0.5, update.latency_p50_ms), (0.95, update.latency_p95_ms),
                   (0.99, update.latency_p99_ms)):
        assert got == pytest.approx(nearest_rank(latencies, q), rel=sketch.ALPHA * 1.0001)
    assert update.latency_max_ms == max(latencies)


_TIMES = ("window_start", "window_end", "as_of")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from((200, 201, 301, 404, 429, 500, 503)),
    st.floats(min_value=0, max_value=3_600_000, allow_nan=False) | st.integers(0, 10_000),
    st.integers(0, 2**40), st.integers(0, 2**40),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.integers(-3000, 6999)), min_size=1, max_size=40))
def test_a_frame_is_the_stats_update_msgspec_would_write(
        events: list[tuple[int, float, int, int, float, int]]) -> None:
    """The tier writes its frames' data from a cached head and a numbers-only struct
    (`LiveTier._data`, for speed): it must decode to the figures of the events, and be the
    document msgspec writes for their `StatsUpdate` (the same keys in the same order, the
    same values)."""
    live, _, conns = tier("alice")
    live.fold([(b"alice", event(status=status, latency=latency, tokens_in=tin, tokens_out=tout,
                                cost_usd=cost, ts=int(NOW * 1000) + offset))
               for status, latency, tin, tout, cost, offset in events])
    (due,) = live.collect(NOW)
    live.deliver(due, 1234)
    prefix = conns["alice"].offered[0][0]
    head, tail = '{"event":"usage_stats_update","data":', ',"ts":1234,'
    assert prefix.startswith(head) and prefix.endswith(tail)
    n = len(events)
    ok = sum(1 for e in events if e[0] < 400)
    client = sum(1 for e in events if 400 <= e[0] < 500)
    server = n - ok - client
    latencies = [float(e[1]) for e in events]
    total = 0.0
    cost = 0.0
    for e in events:  # in the fold's order: the same float sums
        total += e[1]
        cost += e[4]
    start = datetime.fromtimestamp(1_700_000_000, tz=UTC)
    expected = StatsUpdate(
        user_id="alice", service="openai", window_start=start,
        window_end=datetime.fromtimestamp(1_700_000_010, tz=UTC), window_seconds=10,
        requests=n, successes=ok, client_errors=client, server_errors=server,
        success_rate=ok / n, error_rate=(client + server) / n, server_error_rate=server / n,
        latency_avg_ms=total / n, latency_p50_ms=nearest_rank(latencies, 0.5),
        latency_p95_ms=nearest_rank(latencies, 0.95),
        latency_p99_ms=nearest_rank(latencies, 0.99), latency_max_ms=max(latencies),
        tokens_in=sum(e[2] for e in events), tokens_out=sum(e[3] for e in events),
        cost_usd=round(cost, 9), latency_sum_ms=total, final=False,
        as_of=datetime.fromtimestamp(int(NOW * 1000 + max(e[5] for e in events)) / 1000,
                                     tz=UTC))
    assert live.update(due) == expected
    assert decode_server_frame(f'{prefix}"seq":1}}')[1] == expected
    document = msgspec.json.decode(prefix[len(head):-len(tail)])
    written = msgspec.json.decode(_enc.encode(expected))
    assert list(document) == list(written)
    for key, value in written.items():
        if key in _TIMES:
            assert datetime.fromisoformat(document[key]) == datetime.fromisoformat(value)
        else:
            assert document[key] == value and type(document[key]) is type(value), key


def test_a_frame_escapes_its_names() -> None:
    live, _, conns = tier('al"ice\\')
    live.fold([(b'al"ice\\', event('al"ice\\'))])
    emit(live, _)
    (update,) = conns['al"ice\\'].updates()
    assert update.user_id == 'al"ice\\' and update.requests == 1


def test_every_counter_is_described() -> None:
    live, _, _ = tier()
    assert set(live.counters()) == set(LIVE_DESCRIBED)


def test_final_frames_say_final_and_carry_the_record_as_written() -> None:
    settings = load(dev=True, kafka_bootstrap="127.0.0.1:1")
    registry = Registry(max_per_user=5, alerts_topic="a", notifications_topic="n",
                        apikeys_topic="k")
    router = Router(settings, registry, BridgeStats(), ManualClock(NOW))
    value = kh.stats("alice") + b" \n"
    record = msgspec.json.decode(value, type=StatsRecord)
    routed = router.prepare(Kind.STATS, b"alice", value, 7)
    assert routed is not None
    frame, data = decode_server_frame(routed.prefix + '"seq":1}')
    assert frame.event == "usage_stats_update" and frame.ts == int(NOW * 1000)
    assert msgspec.structs.asdict(data) == {**msgspec.structs.asdict(record), "final": True,
                                            "as_of": None, "deduplicated": True}
    assert routed.coalesce == (record.service, int(record.window_start.timestamp()))
    assert router.prepare(Kind.STATS, b"bob", value, 8) is None  # another user's record


# -- the bridge, with the real broker ---------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


async def provisional(ws: Any, timeout: float = 5.0) -> tuple[Any, StatsUpdate]:
    frame, data = await expect(ws, "usage_stats_update", timeout)
    return frame, data


@pytest.mark.integration
def test_provisional_frames_from_the_broker(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(kafka_settings)
    producer = kh.TestProducer(kafka_settings)

    async def main() -> None:
        alice, _ = await login(server.url, kafka_settings, "alice")
        bob, _ = await login(server.url, kafka_settings, "bob")
        carol, _ = await login(server.url, kafka_settings, "carol")
        await send(carol, "unsubscribe", {"channels": ["stats"]})
        await expect(carol, "subscribed")
        ts = now_ms()
        latencies = [float(random.randint(1, 2000)) for _ in range(40)]
        ids = [uuid.uuid4().hex for _ in latencies]
        sent = time.monotonic()
        for i, (event_id, lat) in enumerate(zip(ids, latencies, strict=True)):
            producer.send("usage.events", "alice",
                          event(ts=ts, latency=lat, event_id=event_id,
                                status=500 if i % 10 == 0 else 200))
        for event_id in ids[:7]:  # retries: counted once
            producer.send("usage.events", "alice", event(ts=ts, event_id=event_id))
        producer.send("usage.events", "carol", event("carol", ts=ts))
        producer.flush()
        frame, update = await provisional(alice)
        while update.requests < 40:  # the events may have come in two batches
            frame, update = await provisional(alice, 3)
        assert time.monotonic() - sent < 3.0
        assert update.final is False and frame.cursor is None
        assert (update.requests, update.server_errors, update.successes) == (40, 4, 36)
        assert update.latency_p50_ms == nearest_rank(latencies, 0.5)
        assert update.latency_p99_ms == nearest_rank(latencies, 0.99)
        assert update.latency_max_ms == max(latencies)
        await quiet(bob, 0.5)  # another user's events
        await quiet(carol, 0.1)  # not subscribed to stats

        # the final record replaces the provisional one, and stays the last word
        window_s = ts // 1000 - ts // 1000 % kafka_settings.window_seconds
        final = _final_record("alice", window_s, kafka_settings.window_seconds, requests=41)
        producer.send("usage.stats", "alice", final)
        producer.flush()
        _, last = await expect(alice, "usage_stats_update")
        assert last.final is True and last.requests == 41
        producer.send("usage.events", "alice", event(ts=ts))  # late for that window
        producer.flush()
        await quiet(alice, 1.5)
        for ws in (alice, bob, carol):
            await ws.close()

    asyncio.run(main())


@pytest.mark.integration
def test_one_frame_per_second_per_service_while_events_flow(kafka_settings: Settings,
                                                            bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(kafka_settings)
    producer = kh.TestProducer(kafka_settings)

    async def main() -> None:
        alice, _ = await login(server.url, kafka_settings, "alice")
        received: list[tuple[str, int, int]] = []  # service, frame ts, requests

        async def reader() -> None:
            while True:
                frame, data = await recv(alice, 10)
                if frame.event == "usage_stats_update":
                    received.append((data.service, frame.ts, data.requests))

        task = asyncio.create_task(reader())
        ts = now_ms()
        for _ in range(28):  # 3.5 s of events, 2 services, 8 events/s each
            for service in ("openai", "anthropic"):
                producer.send("usage.events", "alice", event(service=service, ts=ts))
            producer.flush()
            await asyncio.sleep(0.125)
        await asyncio.sleep(2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for service in ("openai", "anthropic"):
            mine = [(t, n) for s, t, n in received if s == service]
            assert len(mine) >= 3, received
            assert mine[-1][1] == 28  # every event counted once the flow stopped
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(mine)]
            assert min(gaps) >= 900, gaps  # bridge frame times, ms (tick jitter allowed)
        await alice.close()

    asyncio.run(main())


def _final_record(user: str, window_s: int, window_seconds: int, requests: int) -> bytes:
    record = msgspec.json.decode(kh.stats(user, requests=requests), type=StatsRecord)
    return _enc.encode(msgspec.structs.replace(
        record, window_start=datetime.fromtimestamp(window_s, tz=UTC),
        window_end=datetime.fromtimestamp(window_s + window_seconds, tz=UTC),
        window_seconds=window_seconds))

"""Pure units: queue policy, cursors, partitioner, limits, secret detection, the router's
key-versus-user check for every message kind."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import pytest

from core.clock import ManualClock
from core.kafka import murmur2, partition_for
from core.limits import TokenBucket
from core.secrets import find_secret, looks_like_secret, secret_field_name
from core.settings import Settings
from schemas.api_keys import ApiKeyAction, ApiKeyEvent, DeclaredBy
from schemas.notifications import NotificationDelete
from schemas.ws import (
    CURSOR_EVENTS,
    MAX_NESTING,
    SERVER_EVENTS,
    InvalidFrame,
    decode_client_frame,
    decode_server_frame,
)
from tests.ws import kafka_helpers as kh
from ws_bridge import cursor
from ws_bridge.connection import (
    CLOSE_OVERFLOW,
    CURSOR_ALERTS,
    CURSOR_API_KEYS,
    CURSOR_NOTIFICATIONS,
    Connection,
)
from ws_bridge.registry import Registry
from ws_bridge.router import Kind, Mode, Router
from ws_bridge.stats import BridgeStats


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def send_text(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)


def make(max_queue: int = 8) -> tuple[Connection, FakeSocket, BridgeStats]:
    sock, stats = FakeSocket(), BridgeStats()
    clock = ManualClock()
    conn = Connection(sock, "c1", "alice", (), max_queue=max_queue,  # type: ignore[arg-type]
                      bucket=TokenBucket(1, 1, clock), usage_bucket=TokenBucket(1, 1, clock),
                      stats=stats)
    return conn, sock, stats


def drain(conn: Connection) -> None:
    async def main() -> None:
        task = asyncio.get_running_loop().create_task(conn.run_sender())
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_stats_coalesce_latest_wins() -> None:
    conn, sock, stats = make()
    conn.offer_stats('{"v":1,', ("openai", 10))
    conn.offer_stats('{"v":2,', ("anthropic", 10))
    conn.offer_stats('{"v":3,', ("openai", 10))
    conn.offer_stats('{"v":4,', ("openai", 20))
    drain(conn)
    assert sock.sent == ['{"v":3,"seq":1}', '{"v":2,"seq":2}', '{"v":4,"seq":3}']
    assert stats.stats_coalesced == 1


class BatchWriter:
    """A writer that takes any number of frames at once (as uvicorn_fast's does)."""

    batches = True
    closed = False

    def __init__(self) -> None:
        self.paused = False
        self.writes: list[list[str]] = []

    def write(self, text: str) -> bool:
        self.writes.append([text])
        return True

    def writelines(self, texts: list[str]) -> bool:
        self.writes.append(texts)
        return True


def test_stats_are_written_at_once_only_with_nothing_queued_ahead() -> None:
    sock, stats, writer = FakeSocket(), BridgeStats(), BatchWriter()
    clock = ManualClock()
    conn = Connection(sock, "c1", "alice", (), max_queue=8,  # type: ignore[arg-type]
                      bucket=TokenBucket(1, 1, clock), usage_bucket=TokenBucket(1, 1, clock),
                      stats=stats, writer=writer)  # type: ignore[arg-type]
    assert not conn.write_stats(['{"v":0,'])  # not open yet: nothing written, nothing taken
    conn.start()
    assert conn.write_stats(['{"v":1,', '{"v":2,'])
    assert writer.writes == [['{"v":1,"seq":1}', '{"v":2,"seq":2}']]
    conn.offer_stats('{"final":1,', ("openai", 10), flush=False)  # queued (a held final)
    assert not conn.write_stats(['{"v":3,'])  # behind it: the caller offers instead
    writer.paused = True
    conn.queue.clear()
    assert not conn.write_stats(['{"v":4,'])  # a paused writer takes nothing
    writer.paused = False
    assert conn.write_stats(['{"v":5,'])
    assert writer.writes[-1] == ['{"v":5,"seq":3}'] and stats.frames_out == 3


def test_must_frames_overflow_closes_4008_and_memory_is_bounded() -> None:
    conn, sock, stats = make(max_queue=4)
    for i in range(4):
        conn.offer_must(f'{{"n":{i},')
    for i in range(100):
        conn.offer_stats('{"s":1,', ("svc", i))  # dropped: queue full
        conn.offer_droppable('{"a":1,')
    assert len(conn.queue) == 4 and conn.close_code is None
    conn.offer_must('{"n":4,')
    assert conn.close_code == CLOSE_OVERFLOW and not conn.queue
    conn.offer_must('{"n":5,')
    assert not conn.queue
    drain(conn)
    assert sock.closed is not None and sock.closed[0] == CLOSE_OVERFLOW
    assert sock.sent == []
    assert stats.closed_overflow == 1 and stats.stats_dropped == 100
    assert stats.activity_dropped == 100


def test_cursor_frames_skip_before_position_and_carry_cursor() -> None:
    conn, sock, _ = make()
    conn.part_a, conn.pos_a, conn.part_n, conn.pos_n, conn.part_k, conn.pos_k = 1, 10, 2, 5, 0, 3
    conn.offer_cursor('{"x":"old",', CURSOR_ALERTS, 9)
    conn.offer_cursor('{"x":"a",', CURSOR_ALERTS, 10)
    conn.offer_cursor('{"x":"n",', CURSOR_NOTIFICATIONS, 7)
    conn.offer_cursor_skip(CURSOR_NOTIFICATIONS, 8)
    conn.offer_cursor('{"x":"k-old",', CURSOR_API_KEYS, 2)
    conn.offer_cursor('{"x":"k",', CURSOR_API_KEYS, 4)
    drain(conn)
    assert sock.sent == ['{"x":"a","cursor":"2.1.11.2.5.0.3","seq":1}',
                         '{"x":"n","cursor":"2.1.11.2.8.0.3","seq":2}',
                         '{"x":"k","cursor":"2.1.11.2.9.0.5","seq":3}']
    assert conn.cursor() == "2.1.11.2.9.0.5"


def test_cursor_roundtrip_and_rejects() -> None:
    c = cursor.decode("2.3.100.0.7.1.9")
    assert c == cursor.Cursor(3, 100, 0, 7, 1, 9) and c.encode() == "2.3.100.0.7.1.9"
    assert c.has_api_keys
    for bad in ("", "2.1.1.1.1", "1.1.1.1", "1.a.1.1.1", "1.-1.1.1.1", "1.1.1.1.1.1",
                "2.1.1.1.1.1", "3.1.1.1.1.1.1", "2.1.1.1.1.1.1.1", "2.1.1.1.1.70000.1",
                "1.\u00b2.1.1.1"):
        with pytest.raises(cursor.BadCursor):
            cursor.decode(bad)


def test_version_1_cursors_still_resume_without_an_api_key_position() -> None:
    """A cursor written before API-key updates were resumable still decodes; a resume from
    it takes API-key updates from the connection's live position (what version 1 promised)
    and answers a complete version-2 cursor."""
    old = cursor.decode("1.3.100.0.7")
    assert old == cursor.Cursor(3, 100, 0, 7) and not old.has_api_keys
    conn, _, _ = make()
    conn.part_a, conn.pos_a, conn.part_n, conn.pos_n, conn.part_k, conn.pos_k = 3, 90, 0, 5, 2, 40
    start = conn.resume_from(old)
    assert start == cursor.Cursor(3, 100, 0, 7, 2, 40)
    assert conn.cursor() == "2.3.100.0.7.2.40"
    conn.rewind(cursor.Cursor(3, 90, 0, 5, 2, 40))
    assert conn.cursor() == "2.3.90.0.5.2.40"
    # a cursor of other partitions (the topics were repartitioned) is not resumable
    assert conn.resume_from(cursor.Cursor(3, 1, 0, 1, 1, 1)) is None
    assert conn.resume_from(cursor.Cursor(1, 1, 0, 1)) is None


@pytest.mark.parametrize(("key", "java"), [
    ("21", -973932308), ("foobar", -790332482), ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829), ("abc", 479470107), ("", 275646681),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
])
def test_murmur2_matches_kafka(key: str, java: int) -> None:
    assert murmur2(key.encode()) == java & 0xFFFFFFFF


def test_partition_for_is_stable() -> None:
    assert all(0 <= partition_for(f"user-{i}".encode(), 4) < 4 for i in range(100))


def test_token_bucket() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert bucket.take() and not bucket.take()
    clock.advance(100)
    assert sum(bucket.take() for _ in range(10)) == 3


def test_secret_detection() -> None:
    allowed = frozenset({"api_key_id", "service", "name"})
    for name in ("secret", "api_key", "apiKey", "key", "password", "token", "client_secret",
                 "private_key", "access_token"):
        assert secret_field_name(name, allowed), name
    for name in ("api_key_id", "service", "name", "label"):
        assert not secret_field_name(name, allowed), name
    for value in ("sk-abcdefghijkl", "sk_live_abcdefghij12", "AKIAABCDEFGHIJKLMNOP",
                  "ghp_abcdefghijklmnopqrstuvwxyz0123", "xoxb-1234567890-abc",
                  "Zx8Qp2LmN4vB7tR1yU6wE3sA9dF5gH0j", "eyJhbGciOiJIUzI1NiJ9.eyJz.x"):
        assert looks_like_secret(value), value
    for value in ("prod key", "openai", "3f2b1c4e-9a7d-4e2b-8c1d-0a9b8c7d6e5f",
                  "3f2b1c4e9a7d4e2b8c1d0a9b8c7d6e5f", "my-production-key-for-billing",
                  "key_123"):
        assert not looks_like_secret(value), value
    assert find_secret({"api_key_id": "k", "name": "prod"}, allowed) is None
    assert "looks like a key secret" in (find_secret({"password": "x"}, allowed) or "")
    nested = {"name": "n", "meta": {"deep": ["sk-abcdefghijkl"]}}
    assert "holds what looks like" in (find_secret(nested, allowed) or "")


def test_stats_snapshot() -> None:
    snap: dict[str, Any] = BridgeStats().snapshot()
    assert snap["consumer_lag"] == -1 and snap["frames_out"] == 0


VALUES = {Kind.STATS: kh.stats, Kind.ALERTS: kh.alert, Kind.NOTIFICATIONS: kh.notification,
          Kind.API_KEYS: kh.apikey, Kind.ACTIVITY: kh.usage}


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_router_refuses_a_value_for_another_user(kind: Kind, unit_settings: Settings) -> None:
    """For every kind, a record whose key and value name different users is not deliverable."""
    stats = BridgeStats()
    registry = Registry(max_per_user=3, alerts_topic="a", notifications_topic="n",
                        apikeys_topic="k")
    router = Router(unit_settings, registry, stats, ManualClock())
    value = VALUES[kind]("alice")
    routed = router.prepare(kind, b"alice", value, 7)
    assert routed is not None and routed.user_id == "alice"
    assert router.prepare(kind, b"bob", value, 8) is None
    assert router.prepare(kind, b"*", value, 9) is None  # not a broadcast either
    assert router.prepare(kind, b"alice", VALUES[kind]("bob"), 10) is None
    assert stats.decode_errors == 3


def test_router_broadcasts_only_a_system_notification(unit_settings: Settings) -> None:
    stats = BridgeStats()
    registry = Registry(max_per_user=3, alerts_topic="a", notifications_topic="n",
                        apikeys_topic="k")
    router = Router(unit_settings, registry, stats, ManualClock())
    routed = router.prepare(Kind.NOTIFICATIONS, b"*", kh.notification("*"), 1)
    assert routed is not None and routed.mode is Mode.BROADCAST
    assert router.prepare(Kind.NOTIFICATIONS, b"alice", kh.notification("*"), 2) is None
    assert stats.decode_errors == 1


def test_router_frames_each_kind_of_notification_message(unit_settings: Settings) -> None:
    """A notification, a read and a delete each have their own frame, all with a cursor; a
    delete is never mistaken for a read (kind "delete" → `notification_deleted`)."""
    router = Router(unit_settings, Registry(max_per_user=3, alerts_topic="a",
                                            notifications_topic="n", apikeys_topic="k"),
                    BridgeStats(), ManualClock(5.0))
    at = kh.T0.isoformat()
    values = {
        "new_notification": kh.notification("alice"),
        "notification_read": msgspec.json.encode(
            {"kind": "read", "notification_id": "n1", "user_id": "alice", "read": True,
             "at": at}),
        "notification_deleted": msgspec.json.encode(
            {"kind": "delete", "notification_id": "n1", "user_id": "alice", "at": at}),
    }
    for offset, (event, value) in enumerate(values.items()):
        routed = router.prepare(Kind.NOTIFICATIONS, b"alice", value, offset, origin="c9")
        assert routed is not None and routed.mode is Mode.CURSOR, event
        assert (routed.cursor_topic, routed.offset, routed.origin) == (
            CURSOR_NOTIFICATIONS, offset, "c9")
        frame, data = decode_server_frame(f'{routed.prefix}"cursor":"c","seq":1}}')
        assert frame.event == event
        assert event in CURSOR_EVENTS and SERVER_EVENTS[event] is type(data)
    assert routed is not None
    deleted = decode_server_frame(f'{routed.prefix}"cursor":"c","seq":1}}')[1]
    assert isinstance(deleted, NotificationDelete) and deleted.notification_id == "n1"
    # a user's delete of a system-wide notification is that user's own row: not a broadcast
    assert router.prepare(Kind.NOTIFICATIONS, b"*", values["notification_deleted"], 9) is None


def test_router_api_key_update_carries_its_event_and_a_cursor(unit_settings: Settings) -> None:
    router = Router(unit_settings, Registry(max_per_user=3, alerts_topic="a",
                                            notifications_topic="n", apikeys_topic="k"),
                    BridgeStats(), ManualClock(5.0))
    value = msgspec.json.encode(ApiKeyEvent(
        action=ApiKeyAction.ROTATED, user_id="alice", api_key_id="k1", service="openai",
        name="prod", at=kh.T0, event_id="e-1", declared_by=DeclaredBy.SERVICE))
    routed = router.prepare(Kind.API_KEYS, b"alice", value, 41)
    assert routed is not None and routed.mode is Mode.CURSOR
    assert (routed.cursor_topic, routed.offset) == (CURSOR_API_KEYS, 41)
    frame, update = decode_server_frame(f'{routed.prefix}"cursor":"c","seq":1}}')
    assert frame.event == "api_key_update" and "api_key_update" in CURSOR_EVENTS
    assert (update.action, update.event_id, update.declared_by) == ("rotated", "e-1", "service")
    # a message written before event_id and declared_by existed still routes, as the client's
    old = msgspec.json.encode({"action": "created", "user_id": "alice", "api_key_id": "k1",
                               "service": "openai", "name": "", "at": kh.T0.isoformat()})
    routed = router.prepare(Kind.API_KEYS, b"alice", old, 42)
    assert routed is not None
    update = decode_server_frame(f'{routed.prefix}"cursor":"c","seq":1}}')[1]
    assert (update.event_id, update.declared_by) == ("", "client")


def test_one_client_frame_decoder_bounds_nesting() -> None:
    def frame(depth: int) -> str:  # `depth` levels in all, the envelope included
        return '{"event":"ping","data":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"

    assert decode_client_frame(frame(MAX_NESTING)).event == "ping"
    assert decode_client_frame(frame(MAX_NESTING).encode()).event == "ping"
    for text in (frame(MAX_NESTING + 1), frame(1000), "[" * 50_000, "{" * 40):
        with pytest.raises(InvalidFrame, match="nested deeper"):
            decode_client_frame(text)
    # brackets inside strings (escaped quotes too) are text, not nesting
    quoted = '{"event":"ping","data":{"nonce":"' + '[{\\"' * 100 + '"}}'
    assert decode_client_frame(quoted).event == "ping"
    for junk in ("", "{", "[]", '{"data":{}}', '{"event":5}', "\ud800"):
        with pytest.raises(InvalidFrame):
            decode_client_frame(junk)

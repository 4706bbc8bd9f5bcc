"""Routing from the real broker: each message to its user's connections only; a record whose
key and value name different users reaches nobody, whatever its kind."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

import msgspec
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from core.kafka import consumer_config, partition_for, producer_config
from core.settings import Settings
from schemas.api_keys import ApiKeyEvent
from schemas.events import decode_event
from schemas.notifications import NotificationDelete, NotificationMessage, NotificationRead
from tests.ws import kafka_helpers as kh
from tests.ws.harness import expect, login, quiet, recv, send
from ws_bridge.router import ORIGIN_HEADER

pytestmark = pytest.mark.integration


def read_topic(settings: Settings, topic: str, count: int,
               timeout: float = 15) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(consumer_config(settings, group_id=f"t-{topic}-{random.random()}"))
    name = settings.topic(topic)
    parts = consumer.list_topics(name, timeout=10).topics[name].partitions
    consumer.assign([TopicPartition(name, p, 0) for p in parts])
    out: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        for msg in consumer.consume(100, 0.2):
            if msg.error() is None:
                out.append((msg.key() or b"", msg.value() or b""))
    consumer.close()
    return out


def test_routing_by_kind(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(kafka_settings)
    producer = kh.TestProducer(kafka_settings)

    async def main() -> None:
        alice, auth = await login(server.url, kafka_settings, "alice")
        alice2, _ = await login(server.url, kafka_settings, "alice")
        bob, _ = await login(server.url, kafka_settings, "bob")
        await send(alice, "subscribe", {"channels": ["activity"]})
        await expect(alice, "subscribed")
        producer.send("usage.stats", "alice", kh.stats("alice"))
        producer.send("usage.alerts", "alice", kh.alert("alice"))
        producer.send("notifications", "alice", kh.notification("alice"))
        producer.send("apikey.events", "alice", kh.apikey("alice"))
        producer.send("usage.events", "alice", kh.usage("alice"))
        producer.send("usage.stats", "carol", kh.stats("carol"))  # nobody connected
        producer.send("usage.alerts", "bob", kh.alert("alice"))  # value/key mismatch: dropped
        producer.send("notifications", "*", kh.notification("*"))
        producer.flush()
        got = [await recv(alice) for _ in range(6)]
        events = [f.event for f, _ in got]
        assert sorted(events) == sorted(["usage_stats_update", "usage_alert", "new_notification",
                                         "api_key_update", "usage_event", "system_notification"])
        for frame, data in got:
            if frame.event != "system_notification":
                assert data.user_id == "alice" if hasattr(data, "user_id") else True
            if frame.event in ("usage_alert", "new_notification", "api_key_update"):
                assert frame.cursor and frame.cursor.startswith("2.")
            else:
                assert frame.cursor is None
        got2 = sorted(f.event for f, _ in [await recv(alice2) for _ in range(5)])
        assert "usage_event" not in got2  # activity is opt-in per connection
        frame, _ = await expect(bob, "system_notification")
        await quiet(bob, 0.5)
        await quiet(alice, 0.2)
        assert auth.cursor.startswith("2.")
        for ws in (alice, alice2, bob):
            await ws.close()

    asyncio.run(main())
    assert server.bridge.stats.messages_skipped >= 1


MAKERS = {"usage.stats": lambda u, n: kh.stats(u, window=n),
          "usage.alerts": kh.alert, "notifications": kh.notification,
          "apikey.events": lambda u, n: kh.apikey(u, f"{u}:k{n}"), "usage.events": kh.usage}


def test_mismatched_key_and_value_reach_nobody(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    """Per kind, records keyed by one connected user with another connected user's value (and
    the broadcast key with a user's value) are dropped; then each user's own record of the same
    topic, same partition (so read after them), is the only frame either gets."""
    server = bridges(kafka_settings)
    producer = kh.TestProducer(kafka_settings)

    async def main() -> None:
        conns = {u: (await login(server.url, kafka_settings, u))[0] for u in ("alice", "bob")}
        for ws in conns.values():
            await send(ws, "subscribe", {"channels": ["activity"]})
            await expect(ws, "subscribed")
        for topic, make in MAKERS.items():
            producer.send(topic, "bob", make("alice", 1))
            producer.send(topic, "alice", make("bob", 2))
            producer.send(topic, "*", make("alice", 3))
        for topic, make in MAKERS.items():  # the sentinels, after them in each partition
            for user in conns:
                producer.send(topic, user, make(user, 9))
        producer.flush()
        for user, ws in conns.items():
            events = []
            for _ in MAKERS:
                frame, data = await recv(ws, timeout=10)
                owner = getattr(data, "user_id", None) or data.api_key_id.split(":")[0]
                assert owner == user, (user, frame.event, data)
                events.append(frame.event)
            assert sorted(events) == sorted(["usage_stats_update", "usage_alert",
                                             "new_notification", "api_key_update",
                                             "usage_event"])
            await quiet(ws, 0.5)
        for ws in conns.values():
            await ws.close()

    asyncio.run(main())
    # counted when decoded: both cross-keyed records of each kind, and the "*"-keyed
    # notification (other "*"-keyed records are skipped unread: nobody has that key)
    assert server.bridge.stats.decode_errors == 2 * len(MAKERS) + 1


def test_a_deletion_reaches_the_users_other_sockets(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    """A `NotificationDelete` on `notifications` is `notification_deleted` (never a read),
    with a cursor, on the user's sockets but the one that caused it (the origin header),
    and is replayed on resume."""
    server = bridges(kafka_settings)
    producer = Producer(producer_config(kafka_settings, **{"linger.ms": 0}))
    topic = kafka_settings.topic("notifications")

    def delete(notification_id: str, origin: str | None = None) -> None:
        value = msgspec.json.encode(NotificationDelete(
            notification_id=notification_id, user_id="alice", at=kh.T0))
        headers: list[tuple[str, str | bytes | None]] | None = (
            [(ORIGIN_HEADER, origin.encode())] if origin is not None else None)
        producer.produce(topic, value, b"alice", headers=headers)
        assert producer.flush(10) == 0

    async def main() -> None:
        phone, auth = await login(server.url, kafka_settings, "alice")
        laptop, _ = await login(server.url, kafka_settings, "alice")
        bob, _ = await login(server.url, kafka_settings, "bob")
        delete("n1")
        for ws in (phone, laptop):
            frame, data = await expect(ws, "notification_deleted")
            assert isinstance(data, NotificationDelete) and frame.cursor is not None
            assert (data.notification_id, data.user_id) == ("n1", "alice")
        delete("n2", origin=auth.connection_id)  # the phone deleted it
        frame, data = await expect(laptop, "notification_deleted")
        assert data.notification_id == "n2"
        await quiet(phone, 0.3)
        await quiet(bob, 0.3)
        ws, _ = await login(server.url, kafka_settings, "alice", resume_from=auth.cursor)
        replayed = [(await expect(ws, "notification_deleted"))[1].notification_id
                    for _ in range(2)]
        assert replayed == ["n1", "n2"]
        await quiet(ws, 0.3)
        for sock in (phone, laptop, bob, ws):
            await sock.close()

    asyncio.run(main())


def test_partitioner_matches_the_producer(kafka_settings: Settings) -> None:
    producer = kh.TestProducer(kafka_settings)
    for i in range(50):
        producer.send("usage.alerts", f"user-{i}", kh.alert(f"user-{i}"))
    producer.flush()
    n = kafka_settings.topic_partitions
    assert all(partition_for(key.encode(), n) == p for key, p, _ in producer.partitions)


def test_client_events_through_kafka(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(kafka_settings)

    async def main() -> None:
        phone, _ = await login(server.url, kafka_settings, "alice")
        laptop, _ = await login(server.url, kafka_settings, "alice")
        bob, _ = await login(server.url, kafka_settings, "bob")
        await send(phone, "track_usage", {"event_id": "e1", "ts": 1_714_521_600_000,
                                          "api_key_id": "k1", "service": "openai",
                                          "status_code": 500, "latency_ms": 3})
        await send(phone, "mark_notification_read", {"notification_id": "n1", "read": True})
        _, echo = await expect(laptop, "notification_read", timeout=10)
        assert (echo.notification_id, echo.read, echo.user_id) == ("n1", True, "alice")
        await send(laptop, "api_key_created", {"api_key_id": "k7", "service": "openai",
                                               "name": "ci"})
        for ws in (phone, laptop):
            seen = {}
            for _ in range(2):
                frame, data = await recv(ws, timeout=10)
                seen[frame.event] = data
            assert seen["api_key_update"].api_key_id == "k7"
            assert seen["new_notification"].template == "api_key_created"
        await quiet(phone, 0.3)  # its own read-state change is not echoed back
        await quiet(bob, 0.3)
        for ws in (phone, laptop, bob):
            await ws.close()

    asyncio.run(main())
    events = read_topic(kafka_settings, "usage.events", 1)
    assert [(k, decode_event(v).user_id, decode_event(v).status_code) for k, v in events] == [
        (b"alice", "alice", 500)]
    notes = [msgspec.json.decode(v, type=NotificationMessage)  # type: ignore[arg-type]
             for _, v in read_topic(kafka_settings, "notifications", 2)]
    assert any(isinstance(n, NotificationRead) and n.notification_id == "n1" for n in notes)
    keys = read_topic(kafka_settings, "apikey.events", 1)
    assert msgspec.json.decode(keys[0][1], type=ApiKeyEvent).api_key_id == "k7"


def test_isolation_fuzz(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(kafka_settings)
    producer = kh.TestProducer(kafka_settings)
    rng = random.Random(7)
    users = [f"u{i:03d}" for i in range(100)]
    absent = [f"x{i:03d}" for i in range(20)]
    makers = MAKERS
    expected: dict[str, int] = defaultdict(int)
    sent: list[tuple[str, str]] = []
    mismatched = 0

    async def main() -> None:
        conns = {}
        for start in range(0, 100, 25):
            batch = await asyncio.gather(*(login(server.url, kafka_settings, u)
                                           for u in users[start:start + 25]))
            conns.update(zip(users[start:start + 25], (ws for ws, _ in batch), strict=True))
        for u in users[:50]:
            await send(conns[u], "subscribe", {"channels": ["activity"]})
            await expect(conns[u], "subscribed")
        nonlocal mismatched
        for n in range(600):
            user = rng.choice(users + absent)
            topic = rng.choice(list(makers))
            if rng.random() < 0.25:  # keyed by `user`, valued for someone else: for nobody
                other = rng.choice([u for u in (*users[:5], *absent[:2], "*") if u != user])
                producer.send(topic, user, makers[topic](other, n))
                mismatched += 1
                continue
            producer.send(topic, user, makers[topic](user, n))
            if user in conns and (topic != "usage.events" or user in users[:50]):
                expected[user] += 1
                sent.append((user, topic))
        producer.flush()

        async def collect(user: str) -> None:
            ws = conns[user]
            for i in range(expected[user]):
                try:
                    frame, data = await recv(ws, timeout=20)
                except TimeoutError:
                    kinds = [t for u, t in sent if u == user]
                    pytest.fail(f"{user}: got {i} of {expected[user]}: {kinds}")
                owner = getattr(data, "user_id", None) or data.api_key_id.split(":")[0]
                assert owner == user, (user, frame.event, owner)
            await quiet(ws, 0.5)

        await asyncio.gather(*(collect(u) for u in users))
        for ws in conns.values():
            await ws.close()

    asyncio.run(main())
    assert mismatched > 100

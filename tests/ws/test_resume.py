"""Resume: missed alerts and notifications replayed once, in order; resync when impossible.
Two bridges: identical per-user streams."""

from __future__ import annotations

import asyncio
import time

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from core.kafka import admin_config
from core.settings import Settings
from tests.ws import kafka_helpers as kh
from tests.ws.harness import expect, login, quiet, recv

pytestmark = pytest.mark.integration


def produce_slowly(producer: kh.TestProducer, items: list[tuple[str, str, bytes]]) -> None:
    for topic, key, value in items:
        producer.send(topic, key, value)
        producer.flush()
        time.sleep(0.005)  # distinct timestamps: the replay merges topics by time


def test_resume_replays_exactly_the_missed(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(kafka_settings)
    producer = kh.TestProducer(kafka_settings)

    async def main() -> None:
        ws, auth = await login(server.url, kafka_settings, "alice")
        produce_slowly(producer, [("usage.alerts", "alice", kh.alert("alice", 0)),
                                  ("notifications", "alice", kh.notification("alice", 0))])
        # live order across topics is not defined; the last frame's cursor covers both
        first, _ = await recv(ws)
        frame, _ = await recv(ws)
        assert {first.event, frame.event} == {"usage_alert", "new_notification"}
        cursor = frame.cursor
        assert cursor is not None and cursor != auth.cursor
        await ws.close()

        missed = []
        for n in range(1, 4):
            missed += [("usage.alerts", "alice", kh.alert("alice", n)),
                       ("notifications", "bob", kh.notification("bob", n)),
                       ("notifications", "alice", kh.notification("alice", n)),
                       ("usage.stats", "alice", kh.stats("alice", window=n))]
        produce_slowly(producer, missed)
        await asyncio.sleep(0.5)  # the bridge has read past them: they are history now

        ws, auth = await login(server.url, kafka_settings, "alice", resume_from=cursor)
        assert auth.cursor == cursor
        got = []
        for _ in range(6):
            frame, data = await recv(ws)
            got.append((frame.event, data.message if frame.event == "usage_alert"
                        else data.title, frame.seq))
            last = frame.cursor
        assert got == [(e, t, seq) for seq, (e, t) in enumerate(
            [(ev, f"{kind} {n}") for n in range(1, 4)
             for ev, kind in (("usage_alert", "alert"), ("new_notification", "note"))],
            start=2)]
        await quiet(ws, 0.5)  # stats are live-only; nothing twice
        produce_slowly(producer, [("usage.alerts", "alice", kh.alert("alice", 4))])
        frame, data = await expect(ws, "usage_alert")
        assert data.message == "alert 4"
        await quiet(ws, 0.3)
        await ws.close()

        # resuming from the last replayed cursor yields only what came after it
        ws, _ = await login(server.url, kafka_settings, "alice", resume_from=last)
        frame, data = await expect(ws, "usage_alert")
        assert data.message == "alert 4"
        await quiet(ws, 0.5)
        await ws.close()

        # garbage → resync_required, and the connection carries on live
        ws, _ = await login(server.url, kafka_settings, "alice", resume_from="nonsense")
        _, resync = await expect(ws, "resync_required")
        assert resync.reason == "invalid_cursor" and resync.cursor.startswith("1.")
        await ws.close()

        # beyond retention: the log start moved past the cursor
        a_part = int(cursor.split(".")[1])
        admin = AdminClient(admin_config(kafka_settings))
        tp = TopicPartition(kafka_settings.topic("usage.alerts"), a_part, 3)
        for future in admin.delete_records([tp]).values():
            future.result(10)
        ws, _ = await login(server.url, kafka_settings, "alice", resume_from=cursor)
        _, resync = await expect(ws, "resync_required")
        assert resync.reason == "beyond_retention"
        produce_slowly(producer, [("usage.alerts", "alice", kh.alert("alice", 5))])
        _, data = await expect(ws, "usage_alert")
        assert data.message == "alert 5"
        await ws.close()

    asyncio.run(main())


def test_two_bridges_identical_streams(kafka_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    one, two = bridges(kafka_settings), bridges(kafka_settings)
    producer = kh.TestProducer(kafka_settings)
    users = [f"u{i}" for i in range(10)]

    async def main() -> None:
        left = {u: (await login(one.url, kafka_settings, u))[0] for u in users}
        right = {u: (await login(two.url, kafka_settings, u))[0] for u in users}
        for n in range(20):
            for u in users:
                producer.send("usage.alerts" if n % 2 else "notifications", u,
                              kh.alert(u, n) if n % 2 else kh.notification(u, n))
        producer.flush()
        for u in users:
            streams = []
            for side in (left, right):
                frames = []
                for _ in range(20):
                    try:
                        frames.append((await recv(side[u], timeout=10))[0])
                    except TimeoutError:
                        pytest.fail(f"{u}: {len(frames)} frames; {one.bridge.stats.snapshot()} "
                                    f"{two.bridge.stats.snapshot()} {producer.partitions[:3]}")
                # per topic, the order is the log's; across topics it is arrival order
                streams.append({event: [bytes(f.data) for f in frames if f.event == event]
                                for event in ("usage_alert", "new_notification")})
            assert streams[0] == streams[1]
            assert len(streams[0]["usage_alert"]) == len(streams[0]["new_notification"]) == 10
        for ws in [*left.values(), *right.values()]:
            await ws.close()

    asyncio.run(main())

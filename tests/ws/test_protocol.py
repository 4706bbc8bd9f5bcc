"""Protocol conformance without Kafka: every client event, every reply, errors never crash."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import msgspec
import pytest
from websockets.exceptions import ConnectionClosed

from core.settings import Settings
from schemas import export
from schemas.api_keys import ApiKeyEvent
from schemas.events import decode_event
from schemas.notifications import NotificationRead
from schemas.system import SystemSnapshot
from schemas.ws import (
    CLIENT_EVENTS,
    MAX_NESTING,
    SERVER_EVENTS,
    client_frame,
    decode_server_frame,
)
from tests.ws.harness import ListSink, expect, login, open_ws, quiet, send, token
from ws_bridge import Limits

EVENT = {"event_id": "e1", "ts": 1_700_000_000_000, "api_key_id": "k1", "service": "openai",
         "status_code": 200, "latency_ms": 12.5}


def test_every_event_is_covered() -> None:
    assert set(CLIENT_EVENTS) == {
        "authenticate", "subscribe", "unsubscribe", "track_usage", "mark_notification_read",
        "subscribe_monitoring", "api_key_created", "api_key_updated", "api_key_deleted", "ping"}
    assert {"authenticated", "error", "usage_stats_update", "usage_alert", "usage_event",
            "new_notification", "system_notification", "api_key_update", "system_stats",
            "pong"} <= set(SERVER_EVENTS)


def test_client_events(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    sink = ListSink()
    server = bridges(unit_settings, kafka=False, sink=sink)
    topic = unit_settings.topic

    async def main() -> None:
        ws, _ = await login(server.url, unit_settings, "alice")
        seqs = [1]

        async def reply(event: str, data: object | None, expected: str):  # type: ignore[no-untyped-def]
            await send(ws, event, data)
            frame, body = await expect(ws, expected)
            seqs.append(frame.seq)
            assert isinstance(frame.ts, int)
            return body

        body = await reply("ping", {"nonce": "abc"}, "pong")
        assert body.nonce == "abc"
        assert (await reply("ping", None, "pong")).nonce is None
        body = await reply("subscribe", {"channels": ["activity"]}, "subscribed")
        assert "activity" in body.channels and "stats" in body.channels
        body = await reply("unsubscribe", {"channels": ["activity", "stats"]}, "subscribed")
        assert set(body.channels) == {"alerts", "notifications", "api_keys"}
        err = await reply("subscribe", {"channels": ["nope"]}, "error")
        assert err.code == "invalid_data" and err.event == "subscribe"
        err = await reply("subscribe_monitoring", None, "error")
        assert err.code == "forbidden"

        # track_usage: validated, keyed and owned by the authenticated user
        await send(ws, "track_usage", EVENT)
        await send(ws, "track_usage", {**EVENT, "user_id": "alice", "event_id": "e2"})
        err = await reply("track_usage", {**EVENT, "user_id": "bob"}, "error")
        assert err.code == "forbidden_user"
        err = await reply("track_usage", {**EVENT, "status_code": 999}, "error")
        assert err.code == "invalid_data" and "status_code" in err.message
        err = await reply("track_usage", [1, 2], "error")
        assert err.code == "invalid_data"

        await send(ws, "mark_notification_read", {"notification_id": "n1", "read": True})
        err = await reply("mark_notification_read", {"notification_id": ""}, "error")
        assert err.code == "invalid_data"

        await send(ws, "api_key_created", {"api_key_id": "k9", "service": "openai", "name": "prod"})
        for bad in ({"secret": "x"}, {"api_key": "x"}, {"password": "p"}, {"token": "t"}):
            err = await reply("api_key_updated", {"api_key_id": "k9", "service": "openai", **bad},
                              "error")
            assert err.code == "secret_refused", bad
        for value in ("sk-proj-abcdefghijklmnop1234", "AKIAABCDEFGHIJKLMNOP",
                      "Zx8Qp2LmN4vB7tR1yU6wE3sA9dF5gH0j"):
            err = await reply("api_key_deleted",
                              {"api_key_id": "k9", "service": "openai", "name": value}, "error")
            assert err.code == "secret_refused", value
        err = await reply("api_key_deleted", {"api_key_id": "k9", "service": "Bad Service"},
                          "error")
        assert err.code == "invalid_data"
        # uuid ids are fine
        await send(ws, "api_key_deleted", {"api_key_id": "3f2b1c4e-9a7d-4e2b-8c1d-0a9b8c7d6e5f",
                                           "service": "openai"})

        err = await reply("nope", None, "error")
        assert err.code == "unknown_event"
        for junk in ("{", "[]", '"x"', '{"data":{}}', json.dumps({"event": 5})):
            await ws.send(junk)
            frame, err = await expect(ws, "error")
            seqs.append(frame.seq)
            assert err.code == "invalid_frame", junk
        await ws.send(b'{"event":"ping"}')
        frame, err = await expect(ws, "error")
        seqs.append(frame.seq)
        assert err.code == "invalid_frame"
        assert seqs == list(range(1, len(seqs) + 1))
        await ws.close()

    asyncio.run(main())
    produced = sink.messages
    usage = [m for m in produced if m[0] == topic("usage.events")]
    assert [m[1] for m in usage] == [b"alice", b"alice"]
    assert [decode_event(m[2]).user_id for m in usage] == ["alice", "alice"]
    reads = [m for m in produced if m[0] == topic("notifications") and b'"read"' in m[2]]
    read = msgspec.json.decode(reads[0][2], type=NotificationRead)
    assert (read.user_id, read.notification_id, read.read) == ("alice", "n1", True)
    assert reads[0][3] is not None and reads[0][3][0][0] == "keypulse-origin"
    keys = [msgspec.json.decode(m[2], type=ApiKeyEvent) for m in produced
            if m[0] == topic("apikey.events")]
    assert [(k.action, k.api_key_id, k.user_id) for k in keys] == [
        ("created", "k9", "alice"), ("deleted", "3f2b1c4e-9a7d-4e2b-8c1d-0a9b8c7d6e5f", "alice")]
    notes = [m for m in produced if m[0] == topic("notifications") and b'"notification"' in m[2]]
    assert len(notes) == 2 and all(m[1] == b"alice" for m in notes)
    for _, _, value, _ in produced:
        assert b"sk-" not in value and b"AKIA" not in value


def test_monitoring_for_admins(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    """`system_stats`: the system snapshot of `GET /v1/admin/system` (its JSON Schema, its
    fields), as the bridge alone sees it: connections from the bridge, no ClickHouse (null,
    with the reason), Kafka's figures once measured (here: a broker that does not answer)."""
    server = bridges(unit_settings, kafka=False, monitor_interval=0.2)
    frames = jsonschema.Draft202012Validator(json.loads(
        (Path(export.JSONSCHEMA_DIR) / "ws_server_frame.v1.json").read_text()))
    fields = {field.name for field in msgspec.structs.fields(SystemSnapshot)}

    async def stats_frame(ws) -> SystemSnapshot:  # type: ignore[no-untyped-def]
        text = await asyncio.wait_for(ws.recv(), 5)
        frames.validate(json.loads(text))
        assert set(json.loads(text)["data"]) == fields
        frame, data = decode_server_frame(text)
        assert frame.event == "system_stats"
        assert isinstance(data, SystemSnapshot)
        return data

    async def main() -> None:
        admin, _ = await login(server.url, unit_settings, "root", "admin")
        user, _ = await login(server.url, unit_settings, "alice")
        await send(admin, "subscribe_monitoring")
        stats = await stats_frame(admin)
        assert stats.websocket is not None
        assert (stats.websocket.connections, stats.websocket.users) == (2, 2)
        assert stats.websocket.consumer_lag is None  # no Kafka consumer: unknown, not 0
        assert stats.process.memory_rss_bytes > 0 and stats.machine.memory_total_bytes > 0
        assert stats.clickhouse is None and "keypulse ws" in stats.unavailable["clickhouse"]
        again = await stats_frame(admin)  # at once: the first lacked Kafka's figures
        assert again.process.uptime_s >= stats.process.uptime_s
        assert again.kafka is None
        assert again.unavailable["kafka"].startswith("Kafka did not answer")
        await quiet(user, 0.5)
        await admin.close()
        await user.close()

    asyncio.run(main())


def test_connection_cap(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False)  # cap 3 per user

    async def main() -> None:
        conns = [(await login(server.url, unit_settings, "alice"))[0] for _ in range(3)]
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": token(unit_settings, "alice")})
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4429
        other, _ = await login(server.url, unit_settings, "bob")
        for c in [*conns, other]:
            await c.close()

    asyncio.run(main())
    assert server.bridge.registry.total == 0


def test_oversize_frame_closes_1009(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    server = bridges(unit_settings, kafka=False)

    async def main() -> None:
        ws, _ = await login(server.url, unit_settings, "alice")
        await ws.send(json.dumps({"event": "ping", "data": {"nonce": "x" * 70_000}}))
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    asyncio.run(main())


def test_flood_is_rate_limited(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(rate=5, burst=10, flood_close_after=200)
    server = bridges(unit_settings, kafka=False, limits=limits)

    async def main() -> None:
        ws, _ = await login(server.url, unit_settings, "alice")
        for i in range(100):
            await send(ws, "ping", {"nonce": str(i)})
        pongs, limited = 0, 0
        try:
            while True:
                frame, data = await asyncio.wait_for(_next(ws), 1.0)
                if frame == "pong":
                    pongs += 1
                elif frame == "error":
                    assert data.code == "rate_limited"
                    limited += 1
        except TimeoutError:
            pass
        assert 10 <= pongs < 20 and limited >= 1
        # a sustained flood is closed 1008
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(1000):
                await send(ws, "ping")
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008

    async def _next(ws):  # type: ignore[no-untyped-def]
        from tests.ws.harness import recv

        frame, data = await recv(ws, 5)
        return frame.event, data

    asyncio.run(main())
    assert server.bridge.stats.rate_limited >= 90


def test_server_frames_are_typed() -> None:
    """Every server event name maps to a msgspec Struct that round-trips."""
    now = datetime(2024, 1, 1, tzinfo=UTC)
    for name, kind in SERVER_EVENTS.items():
        assert issubclass(kind, msgspec.Struct), name
    from schemas.ws import ApiKeyUpdate, decode_server_frame, frame_prefix

    text = frame_prefix("api_key_update", ApiKeyUpdate(action="created", api_key_id="k",  # type: ignore[arg-type]
                                                       service="s", name="n", at=now), 5)
    frame, data = decode_server_frame(text + '"seq":3}')
    assert (frame.event, frame.seq, frame.ts, data.api_key_id) == ("api_key_update", 3, 5, "k")


def _nested(depth: int, open_only: bool = False) -> str:
    return "[" * depth + ("" if open_only else "]" * depth)


def test_deep_nesting_is_an_invalid_frame(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    """Nesting of any depth (up to the frame size) earns `invalid_frame` and the socket stays
    open; MAX_NESTING levels in all are accepted. As the first frame: a clean 4401."""
    sink = ListSink()
    server = bridges(unit_settings, kafka=False, sink=sink)
    ok_data = {"nonce": None}
    ok = json.dumps({"event": "ping", "data": ok_data})
    deepest_ok = '{"event":"track_usage","data":' + json.dumps(
        {**EVENT, "x": json.loads(_nested(MAX_NESTING - 2))}) + "}"
    junk = [
        '{"event":"ping","data":' + _nested(1000) + "}",
        '{"event":"ping","data":' + _nested(30_000) + "}",
        '{"event":"ping","data":' + _nested(5000, open_only=True),
        _nested(32_000),
        '{"event":"track_usage","data":' + json.dumps(
            {**EVENT, "x": json.loads(_nested(MAX_NESTING - 1))}) + "}",
        '{"event":"api_key_created","data":{"api_key_id":"k","service":"s","name":'
        + '{"a":' * 1000 + "1" + "}" * 1000 + "}}",
    ]

    async def main() -> None:
        ws, _ = await login(server.url, unit_settings, "alice")
        for text in junk:
            assert len(text.encode()) <= 64 * 1024
            await ws.send(text)
            _, err = await expect(ws, "error")
            assert err.code == "invalid_frame" and "nested deeper" in err.message, text[:40]
        await ws.send(ok)
        await expect(ws, "pong")
        await ws.send(deepest_ok)  # accepted: produced (its extra field is ignored)
        await send(ws, "ping", {"nonce": "still open"})
        _, pong = await expect(ws, "pong")
        assert pong.nonce == "still open"
        await ws.close()

        ws = await open_ws(server.url)
        await ws.send('{"event":"authenticate","data":' + _nested(20_000) + "}")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4401

    asyncio.run(main())
    assert len(sink.messages) == 1


def test_pending_sockets_are_capped(unit_settings: Settings, bridges) -> None:  # type: ignore[no-untyped-def]
    """At most ws_max_pending sockets wait to authenticate; the next is closed at once with
    1013; a slot frees when a pending socket authenticates or leaves."""
    settings = unit_settings.model_copy(update={"ws_max_pending": 3})
    server = bridges(settings, kafka=False, limits=Limits(auth_timeout=30))
    sessions = server.bridge.sessions

    async def refused() -> int:
        ws = await open_ws(server.url)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 2)
        assert info.value.rcvd is not None
        return info.value.rcvd.code

    async def main() -> None:
        waiting = [await open_ws(server.url) for _ in range(3)]
        assert sessions.pending == 3
        assert await refused() == 1013
        await waiting[0].send(client_frame("authenticate", {"token": token(settings, "alice")}))
        await expect(waiting[0], "authenticated")  # authenticated: no longer pending
        assert sessions.pending == 2
        ws = await open_ws(server.url)
        assert sessions.pending == 3
        assert await refused() == 1013
        await waiting[1].close()  # left: its slot frees
        for _ in range(100):
            if sessions.pending == 2:
                break
            await asyncio.sleep(0.01)
        assert sessions.pending == 2
        await send(ws, "authenticate", {"token": token(settings, "bob")})
        await expect(ws, "authenticated")
        for other in (ws, waiting[0], waiting[2]):
            await other.close()
        for _ in range(100):
            if sessions.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert sessions.pending == 0

    asyncio.run(main())
    assert server.bridge.stats.rejected_pending == 2

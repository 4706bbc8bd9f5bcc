"""The frame-writer seam: `Connection`'s queue policy over a writer, and both writers (uvicorn's
direct transport writes, the plain-ASGI fallback) passing the same tests on a real uvicorn."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from core.clock import ManualClock
from core.limits import TokenBucket
from core.settings import Settings
from tests.ws.harness import Server, login, raw_upgrade, token
from ws_bridge import Limits
from ws_bridge import transport as transport_module
from ws_bridge.connection import API_KEYS, CLOSE_OVERFLOW, Connection, State
from ws_bridge.router import Mode, Routed
from ws_bridge.stats import BridgeStats
from ws_bridge.transport import AsgiWriter
from ws_bridge.uvicorn_fast import SlimWebSocketProtocol, UvicornFrameWriter

# -- Connection over a scripted writer ---------------------------------------------------


class ScriptedWriter:
    """A FrameWriter whose pause the test sets; records what it is given."""

    def __init__(self, batches: bool = False) -> None:
        self.batches = batches
        self.calls = 0  # write/writelines calls
        self.written: list[str] = []
        self.paused = False
        self.pause_after: int | None = None  # pause once this many frames are written
        self.resume: Callable[[], object] | None = None
        self.close_args: tuple[int, str] | None = None
        self.closed = False
        self.stopped = False

    def writelines(self, texts: list[str]) -> bool:
        assert self.batches and not self.paused
        self.calls += 1
        self.written += texts
        return not self.paused

    def write(self, text: str) -> bool:
        assert not self.paused
        self.calls += 1
        self.written.append(text)
        if self.pause_after is not None and len(self.written) >= self.pause_after:
            self.paused = True
        return not self.paused

    def on_resume(self, callback: Callable[[], object]) -> None:
        if self.paused:
            self.resume = callback
        else:
            asyncio.get_running_loop().call_soon(callback)

    def unpause(self) -> None:
        self.paused = False
        self.pause_after = None
        callback, self.resume = self.resume, None
        if callback is not None:
            asyncio.get_running_loop().call_soon(callback)

    def close(self, code: int, reason: str) -> None:
        self.close_args = self.close_args or (code, reason)
        self.closed = True

    def stop(self) -> None:
        self.stopped = True


def scripted(max_queue: int = 8,
             batches: bool = False) -> tuple[Connection, ScriptedWriter, BridgeStats]:
    writer, stats, clock = ScriptedWriter(batches), BridgeStats(), ManualClock()
    conn = Connection(None, "c1", "alice", (), max_queue=max_queue,  # type: ignore[arg-type]
                      bucket=TokenBucket(1, 1, clock), usage_bucket=TokenBucket(1, 1, clock),
                      stats=stats, writer=writer)
    return conn, writer, stats


def seqs(texts: list[str]) -> list[int]:
    return [msgspec.json.decode(t)["seq"] for t in texts]


def test_states_and_what_each_writes() -> None:
    async def main() -> None:
        conn, writer, _ = scripted()
        assert conn.state is State.CONNECTING
        conn.offer_must('{"n":1,')
        assert writer.written == [] and conn.queue  # held until start()
        conn.start()
        assert conn.state is State.OPEN
        conn.offer_must('{"n":2,')
        assert writer.written == ['{"n":1,"seq":1}', '{"n":2,"seq":2}'] and not conn.queue
        conn.close(4401, "token expired")
        assert conn.state is State.CLOSING and writer.close_args == (4401, "token expired")
        conn.offer_must('{"n":3,')
        assert len(writer.written) == 2 and not conn.queue
        conn.stop()
        assert conn.state is State.CLOSED and writer.stopped

    asyncio.run(main())


def test_close_while_connecting_waits_for_start() -> None:
    async def main() -> None:
        conn, writer, _ = scripted(max_queue=2)
        for i in range(3):
            conn.offer_must(f'{{"n":{i},')
        assert conn.state is State.CLOSING and conn.close_code == CLOSE_OVERFLOW
        assert writer.close_args is None  # the session may be mid-send: not yet
        conn.start()
        assert writer.close_args is not None and writer.close_args[0] == CLOSE_OVERFLOW
        assert writer.written == []

    asyncio.run(main())


@pytest.mark.parametrize("batches", [False, True])
def test_paused_writer_queues_coalesces_and_resumes_in_order(batches: bool) -> None:
    async def main() -> None:
        conn, writer, stats = scripted(max_queue=16, batches=batches)
        conn.start()
        writer.pause_after = 1
        conn.offer_must('{"n":1,')
        assert writer.paused
        conn.offer_stats('{"s":1,', ("svc", 1))
        conn.offer_must('{"n":2,')
        conn.offer_stats('{"s":2,', ("svc", 1))  # replaces the queued update
        conn.offer_stats('{"s":3,', ("svc", 2))
        conn.offer_droppable('{"a":1,')
        assert len(writer.written) == 1 and len(conn.queue) == 4
        assert stats.stats_coalesced == 1
        writer.unpause()
        await asyncio.sleep(0)
        assert writer.written == ['{"n":1,"seq":1}', '{"s":2,"seq":2}', '{"n":2,"seq":3}',
                                  '{"s":3,"seq":4}', '{"a":1,"seq":5}']
        assert stats.frames_out == 5
        assert writer.calls == (2 if batches else 5)  # a batching writer: one call for 4

    asyncio.run(main())


def test_write_now_goes_ahead_of_live_frames_and_waits_for_the_writer() -> None:
    async def main() -> None:
        conn, writer, _ = scripted(max_queue=16)
        conn.offer_must('{"live":1,')  # arrives while the replay streams
        writer.pause_after = 2
        replay = asyncio.get_running_loop().create_task(
            _write_all(conn, [f'{{"old":{i},' for i in range(4)]))
        await asyncio.sleep(0.01)
        assert seqs(writer.written) == [1, 2] and not replay.done()  # paused: it waits
        writer.unpause()
        assert await replay
        conn.start()
        assert [msgspec.json.decode(t) for t in writer.written] == [
            {"old": 0, "seq": 1}, {"old": 1, "seq": 2}, {"old": 2, "seq": 3},
            {"old": 3, "seq": 4}, {"live": 1, "seq": 5}]

    asyncio.run(main())


async def _write_all(conn: Connection, prefixes: list[str]) -> bool:
    for prefix in prefixes:
        if not await conn.write_now(prefix):
            return False
    return True


def test_wait_writable_returns_when_drained_or_closed() -> None:
    async def main() -> None:
        conn, writer, _ = scripted(max_queue=16)
        conn.start()
        await asyncio.wait_for(conn.wait_writable(), 1)  # nothing queued, not paused
        writer.closed = True  # the socket went away: a replay can stop
        assert not await conn.write_now('{"gone":1,')
        writer.closed = False
        writer.pause_after = 1
        conn.offer_must('{"n":1,')
        conn.offer_must('{"n":2,')
        waiting = asyncio.get_running_loop().create_task(conn.wait_writable())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        writer.unpause()
        await asyncio.wait_for(waiting, 1)
        assert seqs(writer.written) == [1, 2] and not conn.queue
        writer.paused = True
        waiting = asyncio.get_running_loop().create_task(conn.wait_writable())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        conn.close(1001)
        await asyncio.wait_for(waiting, 1)
        assert not await conn.write_now('{"late":1,')

    asyncio.run(main())


class StuckSocket:
    """A socket whose sends never complete (a peer that stopped reading)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        await asyncio.get_running_loop().create_future()

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)


def test_asgi_writer_gives_up_on_a_peer_that_takes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "CLOSE_GRACE_S", 0.05)

    async def main() -> None:
        sock = StuckSocket()
        writer = AsgiWriter(sock)  # type: ignore[arg-type]
        assert not writer.write("a") and writer.paused
        assert not writer.write("b")  # (a connection never writes while paused)
        await asyncio.sleep(0.01)
        writer.close(CLOSE_OVERFLOW, "overflow")
        assert writer.task is not None
        await asyncio.wait_for(asyncio.gather(writer.task, return_exceptions=True), 1)
        assert writer.task.cancelled() and sock.sent == ["b"] and sock.closed is None
        assert writer.closed and writer.write("c")  # gone: dropped, never paused again
        assert not writer.paused

    asyncio.run(main())


# -- both writers on a real uvicorn ------------------------------------------------------

WRITERS = {"fast": (SlimWebSocketProtocol, UvicornFrameWriter),
           "asgi": ("websockets-sansio", AsgiWriter)}


@pytest.fixture(params=sorted(WRITERS))
def writer_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serve(bridges: Callable[..., Server], settings: Settings, kind: str,
          max_queue: int = 256) -> Server:
    protocol, _ = WRITERS[kind]
    return bridges(settings, kafka=False, limits=Limits(max_queue=max_queue),
                   uvicorn={"ws": protocol})


def writer_of(server: Server, user: str) -> Any:
    async def get() -> Any:
        (conn,) = server.bridge.registry.by_user[user]
        return conn.writer

    return server.run(get())


def test_order_and_seq_with_broadcasts(unit_settings: Settings, bridges, writer_kind: str) -> None:  # type: ignore[no-untyped-def]
    server = serve(bridges, unit_settings, writer_kind)
    bridge = server.bridge

    async def main() -> None:
        ws, _ = await login(server.url, unit_settings, "alice")
        other, _ = await login(server.url, unit_settings, "bob")
        assert isinstance(writer_of(server, "alice"), WRITERS[writer_kind][1])
        batch: list[Routed] = []
        for i in range(300):
            if i % 7 == 0:
                batch.append(Routed("*", 0, Mode.BROADCAST, f'{{"event":"b","data":{{"i":{i}}},'))
            else:
                batch.append(Routed("alice", API_KEYS, Mode.MUST,
                                    f'{{"event":"u","data":{{"i":{i}}},'))
        got = []
        for start in range(0, len(batch), 50):  # 50 at a time: within the queue's bound
            server.call(bridge.fanout.dispatch, batch[start:start + 50])
            got += [msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))
                    for _ in batch[start:start + 50]]
        assert [frame["data"]["i"] for frame in got] == list(range(300))
        assert [frame["seq"] for frame in got] == list(range(2, 302))
        broadcasts = [msgspec.json.decode(await asyncio.wait_for(other.recv(), 10))
                      for _ in range(0, 300, 7)]
        assert [frame["seq"] for frame in broadcasts] == list(range(2, 2 + len(broadcasts)))
        await ws.close()
        await other.close()

    asyncio.run(main())


def read_frames(sock: socket.socket, until: str | None = None,
                timeout: float = 20) -> tuple[list[dict[str, Any]], int | None]:
    """Server frames up to the close frame, EOF or the `until` event: (decoded texts, close
    code)."""
    sock.settimeout(timeout)
    buffer = bytearray()

    def need(n: int) -> bool:
        while len(buffer) < n:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            buffer.extend(chunk)
        return True

    frames: list[dict[str, Any]] = []
    while need(2):
        opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
        assert buffer[1] & 0x80 == 0 and buffer[0] & 0x80, "server frames: unmasked, final"
        head = 2
        if size == 126:
            need(4)
            size, head = struct.unpack("!H", buffer[2:4])[0], 4
        elif size == 127:
            need(10)
            size, head = struct.unpack("!Q", buffer[2:10])[0], 10
        assert need(head + size)
        payload = bytes(buffer[head:head + size])
        del buffer[:head + size]
        if opcode == 0x8:
            return frames, struct.unpack("!H", payload[:2])[0] if payload else None
        if opcode == 0x1:
            frames.append(msgspec.json.decode(payload))
            if frames[-1]["event"] == until:
                break
    return frames, None


async def fill_until_behind(conn: Connection, payload: str) -> int:
    """Offer large frames until they stay queued (the peer is behind); how many were offered."""
    for n in range(1, 5000):
        conn.offer_must(f'{{"event":"big","data":{{"n":{n},"p":"{payload}"}},')
        await asyncio.sleep(0.002)
        if conn.queue:
            await asyncio.sleep(0.05)
            if conn.queue:
                return n
    msg = "the writer never fell behind"
    raise AssertionError(msg)


def test_slow_reader_gets_coalesced_stats_and_no_seq_gap(unit_settings: Settings, bridges,  # type: ignore[no-untyped-def]
                                                         writer_kind: str) -> None:
    server = serve(bridges, unit_settings, writer_kind, max_queue=64)
    sock = raw_upgrade(server.port, token(unit_settings, "slow"))
    try:
        deadline = time.monotonic() + 5
        while "slow" not in server.bridge.registry.by_user and time.monotonic() < deadline:
            time.sleep(0.01)

        async def behind() -> tuple[int, int]:
            (conn,) = server.bridge.registry.by_user["slow"]
            assert isinstance(conn.writer, WRITERS[writer_kind][1])
            offered = await fill_until_behind(conn, "x" * 8000)
            for value in range(1, 6):
                conn.offer_stats(f'{{"event":"stats","data":{{"k":1,"v":{value}}},', ("svc", 1))
            conn.offer_stats('{"event":"stats","data":{"k":2,"v":1},', ("svc", 2))
            conn.offer_must('{"event":"last","data":{},')
            return offered, len(conn.queue)

        offered, queued = server.run(behind(), timeout=60)
        assert queued <= 64
        stats = server.bridge.stats
        assert stats.stats_coalesced == 4 and stats.closed_overflow == 0
        frames, _ = read_frames(sock, until="last")
    finally:
        sock.close()
    assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
    assert frames[0]["event"] == "authenticated"
    bigs = [frame["data"]["n"] for frame in frames if frame["event"] == "big"]
    assert bigs == list(range(1, offered + 1))
    assert [frame["data"] for frame in frames if frame["event"] == "stats"] == [
        {"k": 1, "v": 5}, {"k": 2, "v": 1}]
    assert frames[-1]["event"] == "last"


def test_overflow_closes_4008_after_gapless_frames(unit_settings: Settings, bridges,  # type: ignore[no-untyped-def]
                                                   writer_kind: str) -> None:
    server = serve(bridges, unit_settings, writer_kind, max_queue=16)
    sock = raw_upgrade(server.port, token(unit_settings, "slow"))
    try:
        deadline = time.monotonic() + 5
        while "slow" not in server.bridge.registry.by_user and time.monotonic() < deadline:
            time.sleep(0.01)

        async def overflow() -> int:
            (conn,) = server.bridge.registry.by_user["slow"]
            await fill_until_behind(conn, "y" * 8000)
            for _ in range(17):
                conn.offer_must('{"event":"more","data":{},')
            return conn.close_code or 0

        assert server.run(overflow(), timeout=60) == CLOSE_OVERFLOW
        frames, code = read_frames(sock)  # read at once: the close waits 2 s at most
    finally:
        sock.close()
    assert code == CLOSE_OVERFLOW
    assert server.bridge.stats.closed_overflow == 1
    assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
    assert all(frame["event"] in {"authenticated", "big"} for frame in frames)
    deadline = time.monotonic() + 10
    while server.bridge.registry.total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.bridge.registry.total == 0

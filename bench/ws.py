"""WebSocket bridge benchmark: N authenticated connections to one `keypulse ws` process.

    .venv/bin/python bench/ws.py [--connections 10000] [--rate 1000] [--seconds 20]

Starts `keypulse ws` (a subprocess) against the broker at KEYPULSE_KAFKA_BOOTSTRAP with a
fresh topic prefix, opens the connections from two load processes (a minimal raw-asyncio
WebSocket client, see below), then produces `--rate` per-user notifications per second
(`linger.ms` 0) plus one broadcast per second and prints: connections reached, connect
rate, server RSS per 1,000 connections, p50/p99 latency from Kafka produce (the time is
carried in the message) to client receive, split at the bridge's frame `ts`, the same
latency for a plain Kafka consumer of the same messages (the broker's share on this
machine), frame checks (seq gaps, foreign frames, lost sockets), and CPU.
Raises its own (and the server's) open-file limit. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.auth import mint_token  # noqa: E402
from core.kafka import consumer_config, producer_config  # noqa: E402
from core.settings import Settings, load  # noqa: E402
from infra.kafka import launcher  # noqa: E402
from schemas.notifications import Notification, NotificationType  # noqa: E402


class _Data(msgspec.Struct):
    data: dict[str, str] = {}
    user_id: str = ""


def raise_nofile(n: int = 65_536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(n, hard) if hard != resource.RLIM_INFINITY else n
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- load client (child process) ----------------------------------------------------------
#
# A minimal WebSocket client on raw asyncio protocols (RFC 6455: the handshake, masked
# client frames, unmasked server frames parsed in place, pongs for the server's pings), so
# that 10,000 sockets on the same 2 cores cost the load processes little: the latency
# measured is the bridge's, not the load client's. Every server frame is still decoded
# (msgspec) and checked: seq must be 1, 2, 3… per connection and per-user data must carry
# the connection's user.


class _Frame(msgspec.Struct):
    event: str
    data: _Data
    seq: int = 0
    ts: int = 0  # ms, when the bridge built the frame (after its Kafka consume)


class _Load:
    """Counters and samples of one load process."""

    def __init__(self) -> None:
        self.decoder = msgspec.json.Decoder(_Frame)
        self.latencies: list[float] = []
        self.to_bridge: list[float] = []  # produce → bridge built the frame
        self.broadcasts = 0
        self.seq_errors = 0
        self.foreign = 0
        self.lost = 0  # authenticated sockets that closed before the end
        self.stopping = False


class _Client(asyncio.Protocol):
    __slots__ = ("authed", "buf", "load", "seq", "token", "transport", "upgraded", "user")

    def __init__(self, load: _Load, user: str, token: str,
                 authed: asyncio.Future[None]) -> None:
        self.load = load
        self.user = user
        self.token = token
        self.authed: asyncio.Future[None] | None = authed
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.seq = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(  # type: ignore[union-attr]
            (f"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.authed is not None:
            if not self.authed.done():
                self.authed.set_exception(ConnectionError("closed before authenticated"))
        elif not self.load.stopping:
            self.load.lost += 1

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame (payloads < 64 KiB)."""
        mask = os.urandom(4)
        n = len(payload)
        head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else (
            bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big"))
        masked = int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        assert self.transport is not None
        self.transport.write(head + mask + masked.to_bytes(n, "big"))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.buf:
            data = self.buf + data
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            data = data[end + 4:]
            self.send(1, f'{{"event":"authenticate","data":{{"token":"{self.token}"}}}}'.encode())
        pos, size = 0, len(data)
        while size - pos >= 2:
            length = data[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = 10
            if size - pos < head + length:
                break
            opcode = data[pos] & 0x0F
            payload = data[pos + head:pos + head + length]
            pos += head + length
            if opcode == 1:
                self.on_text(payload, now)
            elif opcode == 9:
                self.send(10, payload)  # pong
            elif opcode == 8:
                assert self.transport is not None
                self.transport.close()
        self.buf = data[pos:]

    def on_text(self, payload: bytes, now: float) -> None:
        load = self.load
        frame = load.decoder.decode(payload)
        self.seq += 1
        if frame.seq != self.seq:
            load.seq_errors += 1
            self.seq = frame.seq
        if self.authed is not None:
            if frame.event == "authenticated" and not self.authed.done():
                self.authed.set_result(None)
            self.authed = None
            return
        data = frame.data
        sent = data.data.get("t")
        if sent is None:
            return
        if frame.event == "system_notification":
            load.broadcasts += 1
            return
        if data.user_id != self.user:
            load.foreign += 1
        load.latencies.append(now - float(sent))
        load.to_bridge.append(frame.ts / 1000 - float(sent))


def client_main(host: str, port: int, users: list[str], settings: Settings, out: mp.Queue,
                stop: mp.Event, ready: mp.Event) -> None:  # type: ignore[type-arg]
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_client(host, port, users, settings, out, stop, ready))


async def _client(host: str, port: int, users: list[str], settings: Settings,
                  out: mp.Queue, stop: mp.Event, ready: mp.Event) -> None:  # type: ignore[type-arg]
    loop = asyncio.get_running_loop()
    load = _Load()
    conns: list[_Client] = []
    sem = asyncio.Semaphore(200)
    failures = [0]

    async def open_one(user: str) -> None:
        token = mint_token(settings, user, ttl_seconds=3600)
        async with sem:
            for _ in range(3):
                authed: asyncio.Future[None] = loop.create_future()
                try:
                    _, client = await loop.create_connection(
                        lambda: _Client(load, user, token, authed), host, port)  # noqa: B023
                    await asyncio.wait_for(authed, 30)
                    conns.append(client)
                    return
                except Exception:
                    await asyncio.sleep(0.5)
            failures[0] += 1

    started = time.time()
    await asyncio.gather(*(open_one(u) for u in users))
    out.put(("connected", len(conns), time.time() - started, failures[0]))
    ready.set()
    cpu0 = time.process_time()
    while not stop.is_set():
        await asyncio.sleep(0.2)
    cpu = time.process_time() - cpu0
    out.put(("latencies", load.latencies, load.to_bridge, load.broadcasts, load.seq_errors,
             load.foreign, load.lost, cpu))
    load.stopping = True
    for client in conns:
        if client.transport is not None:
            client.transport.abort()


# -- producer and measurement (parent) --------------------------------------------------------


class _Probe:
    """A plain Kafka consumer of the same topic in the parent: produce→consume latency of
    the broker alone on this machine, to set the bridge's figures against."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        self.consumer = Consumer(consumer_config(settings, group_id=f"probe-{uuid.uuid4().hex}",
                                                 **{"fetch.wait.max.ms": 5}))
        topic = settings.topic("notifications")
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        decoder = msgspec.json.Decoder(_Data)
        while not self.stop.is_set():
            messages = self.consumer.consume(1, 0.1)
            if messages:
                messages.extend(self.consumer.consume(1999, 0))
            now = time.time()
            for msg in messages:
                if msg.error() is not None or msg.key() == b"*":
                    continue
                sent = decoder.decode(msg.value() or b"{}").data.get("t")
                if sent is not None:
                    self.latencies.append(now - float(sent))

    def close(self) -> list[float]:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()
        return self.latencies


def produce(settings: Settings, users: list[str], rate: int, seconds: float,
            linger_ms: float) -> tuple[int, int]:
    from confluent_kafka import Producer

    producer = Producer(producer_config(settings, **{"linger.ms": linger_ms}))
    enc = msgspec.json.Encoder()
    topic = settings.topic("notifications")
    sent = broadcasts = 0
    producer.produce(topic, key=b"warmup", value=b"{}")  # metadata and connections first
    producer.flush(10)
    start = time.time()
    next_broadcast = start
    while (now := time.time()) - start < seconds:
        due = int((now - start) * rate)
        while sent < due:
            user = random.choice(users)
            note = Notification(notification_id=uuid.uuid4().hex, user_id=user,
                                type=NotificationType.INFO, template="bench", title="t",
                                message="m", created_at=datetime.now(UTC),
                                data={"t": repr(time.time())})
            producer.produce(topic, key=user.encode(), value=enc.encode(note))
            sent += 1
        if now >= next_broadcast:
            note = Notification(notification_id=uuid.uuid4().hex, user_id="*",
                                type=NotificationType.INFO, template="bench", title="b",
                                message="m", created_at=datetime.now(UTC),
                                data={"t": repr(time.time())})
            producer.produce(topic, key=b"*", value=enc.encode(note))
            broadcasts += 1
            next_broadcast += 1.0
        producer.poll(0)
        time.sleep(0.001)
    producer.flush(10)
    return sent, broadcasts


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=1000, help="per-user messages per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loaders", type=int, default=2)
    parser.add_argument("--linger-ms", type=float, default=0.0,
                        help="producer linger.ms (per-user notifications want it at 0)")
    args = parser.parse_args()
    raise_nofile()

    settings = load(dev=True, topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
                    ws_max_connections_per_user=5)
    print(f"broker {settings.kafka_bootstrap}, topic prefix {settings.topic_prefix}")
    launcher.ensure_topics(settings)
    port = free_port()
    env = {**os.environ, "KEYPULSE_DEV": "1", "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix,
           "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "KEYPULSE_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        [sys.executable, "-m", "keypulse.cli", "ws", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=REPO, preexec_fn=raise_nofile)  # noqa: PLW1509 - before threads
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    print("server did not start")
                    return 1
                time.sleep(0.2)
        proc = psutil.Process(server.pid)
        time.sleep(1.0)
        rss_idle = proc.memory_info().rss
        users = [f"user-{i:05d}" for i in range(args.connections)]
        out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        stop = mp.Event()
        loaders = []
        readies = []
        started = time.time()
        for k in range(args.loaders):
            ready = mp.Event()
            p = mp.Process(target=client_main, args=("127.0.0.1", port, users[k::args.loaders],
                                                     settings, out, stop, ready))
            p.start()
            loaders.append(p)
            readies.append(ready)
        connected, failures = 0, 0
        for _ in loaders:
            kind, n, _secs, failed = out.get(timeout=600)
            assert kind == "connected"
            connected += n
            failures += failed
        connect_secs = time.time() - started
        time.sleep(2.0)
        rss_connected = proc.memory_info().rss
        cpu0 = proc.cpu_times()
        t0 = time.time()
        probe = _Probe(settings)
        sent, broadcasts = produce(settings, users, args.rate, args.seconds, args.linger_ms)
        time.sleep(2.0)
        kafka_alone = probe.close()
        cpu1 = proc.cpu_times()
        wall = time.time() - t0
        rss_loaded = proc.memory_info().rss
        stop.set()
        latencies: list[float] = []
        to_bridge: list[float] = []
        received_broadcasts = seq_errors = foreign = lost = 0
        client_cpu = 0.0
        for _ in loaders:
            kind, lat, tb, bc, se, fo, lo, ccpu = out.get(timeout=120)
            lost += lo
            latencies.extend(lat)
            to_bridge.extend(tb)
            received_broadcasts += bc
            seq_errors += se
            foreign += fo
            client_cpu += ccpu
        for p in loaders:
            p.join(timeout=30)
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall * 100
        per_k = (rss_connected - rss_idle) / max(connected, 1) * 1000 / 2**20
        print("--- keypulse ws benchmark ---")
        print(f"connections reached      {connected} / {args.connections} "
              f"({failures} failed)")
        print(f"connect rate             {connected / connect_secs:,.0f} /s "
              f"({connect_secs:.1f} s)")
        print(f"server RSS idle          {rss_idle / 2**20:,.1f} MiB")
        print(f"server RSS connected     {rss_connected / 2**20:,.1f} MiB "
              f"(+{per_k:.1f} MiB per 1,000 connections)")
        total_k = rss_connected / 2**20 / max(connected, 1) * 1000
        print(f"server RSS total/1,000   {total_k:.1f} MiB")
        print(f"server RSS under load    {rss_loaded / 2**20:,.1f} MiB")
        print(f"produced                 {sent} per-user ({sent / args.seconds:,.0f}/s), "
              f"{broadcasts} broadcasts")
        print(f"received                 {len(latencies)} per-user, "
              f"{received_broadcasts} broadcast frames "
              f"(expected {broadcasts * connected})")
        print(f"latency produce→receive  p50 {pct(latencies, 0.5) * 1000:.1f} ms, "
              f"p99 {pct(latencies, 0.99) * 1000:.1f} ms, "
              f"max {max(latencies or [0]) * 1000:.1f} ms")
        print(f"  of which produce→bridge p50 {pct(to_bridge, 0.5) * 1000:.1f} ms, "
              f"p99 {pct(to_bridge, 0.99) * 1000:.1f} ms (bridge frame ts, 1 ms resolution)")
        print(f"Kafka alone (probe)      p50 {pct(kafka_alone, 0.5) * 1000:.1f} ms, "
              f"p99 {pct(kafka_alone, 0.99) * 1000:.1f} ms (plain consumer, same messages)")
        print(f"frame checks             {seq_errors} seq gaps, {foreign} frames of another user, "
              f"{lost} sockets lost during the run")
        print(f"server CPU under load    {cpu:.0f} % of one core")
        print(f"load clients CPU         {client_cpu / wall * 100:.0f} % of one core "
              f"({args.loaders} processes)")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        launcher.delete_topics(settings)


if __name__ == "__main__":
    sys.exit(main())

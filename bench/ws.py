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

The live tier (DESIGN §9, ws_bridge/live.py), with `--events-rate N`:

    .venv/bin/python bench/ws.py --connections 10000 --rate 0 --events-rate 20000 --seconds 30

produces N usage events/s (ts = now, random users and `--services`) to `usage.events`; every
connection is subscribed to `stats` (the default). Each event's produce time is kept per
(user, service, window), and each `usage_stats_update` frame received counts the events it
covers, so the figures are per event: event → first provisional frame that counts it, and
event → final frame (plus window end → final frame). The finals come from `keypulse
pipeline` (started with `--no-alerts`, against an empty chDB directory, warmed up until it
closes a first window) or, with `--finals synthetic`, from this script itself at window end +
lateness (the bridge's share alone). Prints the bridge's CPU (% of one core; the pipeline's
apart), frames per second, the bridge's `live_*` counters from its /metrics.
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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.auth import mint_token  # noqa: E402
from core.kafka import consumer_config, producer_config  # noqa: E402
from core.settings import Settings, load  # noqa: E402
from infra.kafka import launcher  # noqa: E402
from schemas.notifications import Notification, NotificationType  # noqa: E402
from schemas.stats import StatsRecord  # noqa: E402


class _Data(msgspec.Struct):
    data: dict[str, str] = {}
    user_id: str = ""
    # usage_stats_update
    service: str = ""
    window_start: datetime | None = None
    requests: int = 0
    final: bool = True


# a received stats frame: user, service, window start (epoch ms), requests, final, received at,
# built at (the frame's ts, s)
StatsSample = tuple[str, str, int, int, bool, float, float]


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
        self.stats: list[StatsSample] = []
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
        if frame.event == "usage_stats_update":
            if data.user_id != self.user:
                load.foreign += 1
            start = data.window_start
            assert start is not None
            load.stats.append((self.user, data.service, int(start.timestamp() * 1000),
                               data.requests, data.final, now, frame.ts / 1000))
            return
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
             load.foreign, load.lost, cpu, load.stats))
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


# -- the live tier -------------------------------------------------------------------------

SentAt = dict[tuple[str, str, int], list[float]]  # (user, service, window ms) → produce times
PAIRS = 1 << 17  # (user, service) pairs drawn before a run, taken in turn
RESTS = 4096  # bodies' other fields (status, latency, tokens) drawn before a run


def produce_events(settings: Settings, users: list[str], services: list[str], rate: int,
                   seconds: float, sent_at: SentAt, done: threading.Event, *,
                   synthetic_finals: bool) -> tuple[int, int]:
    """`rate` usage events/s (ts = now) for `seconds`, their produce times in `sent_at`; with
    `synthetic_finals`, each window's final records too, at window end + lateness (what the
    pipeline does at the earliest). Sets `done` when the events are produced; returns
    (events, final records) produced."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(settings, **{"linger.ms": 5}))
    enc = msgspec.json.Encoder()
    topic = settings.topic("usage.events")
    stats_topic = settings.topic("usage.stats")
    window_ms = settings.window_seconds * 1000
    lateness_ms = settings.allowed_lateness_seconds * 1000
    open_windows: dict[int, set[tuple[str, str]]] = defaultdict(set)
    sent = finals = 0
    # metadata and connections first (a user nobody watches), or the first events wait
    producer.produce(topic, key=b"warmup", value=enc.encode({
        "event_id": uuid.uuid4().hex, "ts": int(time.time() * 1000), "user_id": "warmup",
        "api_key_id": "k", "service": "warmup", "status_code": 200, "latency_ms": 1}))
    producer.produce(stats_topic, key=b"warmup", value=b"{}")
    producer.flush(10)

    # A final record from a template (bytes formatting: ~1 µs, against ~20 to build and
    # encode a StatsRecord): a close brings 30,000 of them at 10,000 users, and the bench
    # making them the slow way took most of a core from the bridge at that very moment.
    template = enc.encode(StatsRecord(
        user_id="\x01", service="\x02", window_start=datetime.fromtimestamp(0, tz=UTC),
        window_end=datetime.fromtimestamp(window_ms // 1000, tz=UTC),
        window_seconds=window_ms // 1000, requests=111_111_111, successes=222_222_222,
        client_errors=0, server_errors=0, success_rate=1.0, error_rate=0.0,
        server_error_rate=0.0, latency_avg_ms=1.0, latency_p50_ms=1.0, latency_p95_ms=1.0,
        latency_p99_ms=1.0, latency_max_ms=1.0, tokens_in=0, tokens_out=0, cost_usd=0.0))
    for old, new in ((b'"\\u0001"', b"%b"), (b'"\\u0002"', b"%b"),
                     (enc.encode(datetime.fromtimestamp(0, tz=UTC)), b'"%b"'),
                     (enc.encode(datetime.fromtimestamp(window_ms // 1000, tz=UTC)), b'"%b"'),
                     (b"111111111", b"%d"), (b"222222222", b"%d")):
        assert template.count(old) == 1, old
        template = template.replace(old, new)

    def close_windows(now_ms: float, *, everything: bool = False) -> int:
        produced = 0
        for start in sorted(open_windows):
            if not everything and start + window_ms + lateness_ms > now_ms:
                break
            begin = enc.encode(datetime.fromtimestamp(start / 1000, tz=UTC))[1:-1]
            end = enc.encode(datetime.fromtimestamp((start + window_ms) / 1000, tz=UTC))[1:-1]
            for user, service in open_windows.pop(start):
                n = len(sent_at[(user, service, start)])
                producer.produce(stats_topic, key=user.encode(), value=template % (
                    enc.encode(user), enc.encode(service), begin, end, n, n))
                producer.poll(0)
                produced += 1
        return produced

    # The events are made from parts drawn before the run (a (user, service) pair, the
    # rest of the body), so that making one costs ~1 µs, not ~15: at 20,000/s on the same
    # 2 cores the generator would otherwise take a third of a core from what it measures.
    # Every event still has its own id and its produce time as `ts`.
    pairs = [(user, service, user.encode(), enc.encode(user), enc.encode(service))
             for user, service in ((random.choice(users), random.choice(services))
                                   for _ in range(PAIRS))]
    rests = [enc.encode({
        "status_code": 200 if random.random() < 0.97 else random.choice((429, 500, 503)),
        "latency_ms": round(random.lognormvariate(5.5, 0.8), 3),
        "endpoint": "/v1/chat/completions", "method": "POST",
        "tokens_in": random.randint(10, 2000), "tokens_out": random.randint(1, 800),
        "cost_usd": 0.0004})[1:] for _ in range(RESTS)]
    run = os.urandom(8).hex().encode()
    start = time.time()
    while (now := time.time()) - start < seconds:
        due = int((now - start) * rate)
        while sent < due:
            user, service, key, user_json, service_json = pairs[sent % PAIRS]
            stamp = time.time()
            ts = int(stamp * 1000)
            window = ts - ts % window_ms
            value = (b'{"event_id":"%b%08x","ts":%d,"user_id":%b,"api_key_id":"key-1",'
                     b'"service":%b,%b' % (run, sent, ts, user_json, service_json,
                                          rests[sent % RESTS]))
            producer.produce(topic, key=key, value=value)
            sent_at.setdefault((user, service, window), []).append(stamp)
            if synthetic_finals:
                open_windows[window].add((user, service))
            sent += 1
        if synthetic_finals:
            finals += close_windows(now * 1000)
        producer.poll(0)
        time.sleep(0.001)
    producer.flush(10)
    done.set()
    if synthetic_finals:  # the windows still open close as the pipeline would, on time
        while open_windows:
            time.sleep(0.05)
            finals += close_windows(time.time() * 1000)
        producer.flush(10)
    return sent, finals


def live_latencies(sent_at: SentAt, samples: list[StatsSample],
                   window_ms: int) -> dict[str, Any]:
    """Per event: produce → the first provisional frame that counts it, produce → the final
    frame of its window; per window: window end → its final frame (one connection per
    user, so the frames of a (user, service, window) are one stream, in receive order)."""
    frames: dict[tuple[str, str, int], list[tuple[float, int, bool, float]]] = defaultdict(list)
    for user, service, start, requests, final, received, built in samples:
        frames[(user, service, start)].append((received, requests, final, built))
    provisional: list[float] = []
    provisional_built: list[float] = []  # produce → the bridge built the frame
    by_second: dict[int, list[float]] = defaultdict(list)  # event → provisional
    final_lat: list[float] = []
    close: list[float] = []
    close_built: list[float] = []
    uncovered = windows_final = after_final = agreed = 0
    for key, times in sent_at.items():
        covered = 0
        finalized = False
        for received, requests, final, built in sorted(frames.get(key, ())):
            if finalized:
                after_final += 1  # a frame after the final one: must not happen
                continue
            if final:
                final_lat.extend(received - t for t in times)
                close.append(received - (key[2] + window_ms) / 1000)
                close_built.append(built - (key[2] + window_ms) / 1000)
                windows_final += 1
                agreed += requests == covered == len(times)
                finalized = True
                continue
            n = min(requests, len(times))
            if n > covered:
                provisional.extend(received - t for t in times[covered:n])
                for t in times[covered:n]:  # by the event's second in its window
                    by_second[int(t - key[2] / 1000)].append(received - t)
                provisional_built.extend(built - t for t in times[covered:n])
                covered = n
        uncovered += len(times) - covered
    return {"provisional": provisional, "final": final_lat, "close": close,
            "provisional_built": provisional_built, "close_built": close_built,
            "by_second": by_second,
            "uncovered": uncovered, "windows": len(sent_at), "windows_final": windows_final,
            "after_final": after_final, "frames": len(samples), "agreed": agreed,
            "provisional_frames": sum(1 for s in samples if not s[4])}


def start_pipeline(settings: Settings, data_dir: Path) -> subprocess.Popen[bytes]:
    """`keypulse pipeline --no-alerts` on an empty chDB directory, this run's topics."""
    env = {**os.environ, "KEYPULSE_DEV": "1", "KEYPULSE_DATA_DIR": str(data_dir),
           "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix, "KEYPULSE_CLICKHOUSE_DSN": "",
           "KEYPULSE_PIPELINE_HTTP_PORT": "0", "KEYPULSE_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "keypulse.cli", "pipeline", "--no-alerts"],
                            env=env, cwd=REPO)


def warm_up_pipeline(settings: Settings, pipeline: subprocess.Popen[bytes],
                     timeout: float = 180.0) -> bool:
    """One event of a user nobody watches, then wait until the pipeline closes its window:
    it is then consuming, so the run's finals are not a cold start's backlog."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    consumer = Consumer(consumer_config(settings, group_id=f"warm-{uuid.uuid4().hex}"))
    topic = settings.topic("usage.stats")
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    producer = Producer(producer_config(settings))
    producer.produce(settings.topic("usage.events"), key=b"warmup", value=msgspec.json.encode({
        "event_id": uuid.uuid4().hex, "ts": int(time.time() * 1000), "user_id": "warmup",
        "api_key_id": "k", "service": "warmup", "status_code": 200, "latency_ms": 1}))
    producer.flush(10)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and pipeline.poll() is None:
            for msg in consumer.consume(100, 0.5):
                if msg.error() is None and msg.key() == b"warmup":
                    return True
        return False
    finally:
        consumer.close()


def bridge_counters(port: int) -> dict[str, float]:
    """The bridge's `keypulse_ws_live_*` figures from its /metrics."""
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("keypulse_ws_live_"):
            name, _, value = line.partition(" ")
            out[name.removeprefix("keypulse_ws_").removesuffix("_total")] = float(value)
    return out


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
    parser.add_argument("--events-rate", type=int, default=0,
                        help="live tier: usage events per second (0: not measured)")
    parser.add_argument("--services", default="openai,anthropic,stripe",
                        help="live tier: the events' services, comma-separated")
    parser.add_argument("--finals", choices=("pipeline", "synthetic"), default="pipeline",
                        help="live tier: where the final records come from")
    parser.add_argument("--events-for", choices=("connected", "others"), default="connected",
                        help="live tier: events of the connected users, or of as many users "
                             "connected nowhere (the bridge's cost without the tier)")
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
    live = args.events_rate > 0
    pipeline: subprocess.Popen[bytes] | None = None
    data_dir = tempfile.TemporaryDirectory(prefix="kp-bench-ws-")
    try:
        if live and args.finals == "pipeline":
            pipeline = start_pipeline(settings, Path(data_dir.name))
            print("pipeline started; warming up (until it closes a first window)")
            if not warm_up_pipeline(settings, pipeline):
                print("the pipeline did not close a window in time")
                return 1
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
        pipeline_proc = psutil.Process(pipeline.pid) if pipeline is not None else None
        pcpu0 = pipeline_proc.cpu_times() if pipeline_proc is not None else None
        cpu0 = proc.cpu_times()
        t0 = time.time()
        probe = _Probe(settings) if args.rate > 0 else None
        sent_at: SentAt = {}
        live_result: list[tuple[int, int]] = []
        events_done = threading.Event()
        event_users = (users if args.events_for == "connected"
                       else [f"other-{i:05d}" for i in range(args.connections)])
        live_thread = threading.Thread(target=lambda: live_result.append(produce_events(
            settings, event_users, args.services.split(","), args.events_rate, args.seconds,
            sent_at,
            events_done, synthetic_finals=args.finals == "synthetic")), daemon=True)
        if live:
            live_thread.start()
        sent = broadcasts = 0
        if args.rate > 0:
            sent, broadcasts = produce(settings, users, args.rate, args.seconds, args.linger_ms)
        else:
            time.sleep(args.seconds)
        if live:
            events_done.wait()
        time.sleep(2.0)
        kafka_alone = probe.close() if probe is not None else []
        cpu1 = proc.cpu_times()
        pcpu1 = pipeline_proc.cpu_times() if pipeline_proc is not None else None
        wall = time.time() - t0
        rss_loaded = proc.memory_info().rss
        if live:  # the last windows' finals: window + lateness after their last events
            live_thread.join()
            time.sleep(settings.window_seconds + settings.allowed_lateness_seconds + 3
                       if args.finals == "pipeline" else 2.0)
        counters = bridge_counters(port) if live else {}
        stop.set()
        latencies: list[float] = []
        to_bridge: list[float] = []
        samples: list[StatsSample] = []
        received_broadcasts = seq_errors = foreign = lost = 0
        client_cpu = 0.0
        for _ in loaders:
            kind, lat, tb, bc, se, fo, lo, ccpu, st = out.get(timeout=120)
            lost += lo
            latencies.extend(lat)
            to_bridge.extend(tb)
            samples.extend(st)
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
        if args.rate > 0:
            print(f"produced                 {sent} per-user ({sent / args.seconds:,.0f}/s), "
                  f"{broadcasts} broadcasts")
            print(f"received                 {len(latencies)} per-user, "
                  f"{received_broadcasts} broadcast frames "
                  f"(expected {broadcasts * connected})")
            print(f"latency produce→receive  p50 {pct(latencies, 0.5) * 1000:.1f} ms, "
                  f"p99 {pct(latencies, 0.99) * 1000:.1f} ms, "
                  f"max {max(latencies or [0]) * 1000:.1f} ms")
            print(f"  of which produce→bridge p50 {pct(to_bridge, 0.5) * 1000:.1f} ms, "
                  f"p99 {pct(to_bridge, 0.99) * 1000:.1f} ms (bridge frame ts, 1 ms "
                  "resolution)")
            print(f"Kafka alone (probe)      p50 {pct(kafka_alone, 0.5) * 1000:.1f} ms, "
                  f"p99 {pct(kafka_alone, 0.99) * 1000:.1f} ms (plain consumer, same "
                  "messages)")
        if live:
            print_live(args, settings, sent_at, samples, live_result, counters, wall)
            if pcpu0 is not None and pcpu1 is not None:
                pipeline_cpu = (pcpu1.user + pcpu1.system - pcpu0.user - pcpu0.system) / wall
                print(f"pipeline CPU             {pipeline_cpu * 100:.0f} % of one core "
                      "(keypulse pipeline, apart from the bridge)")
        print(f"frame checks             {seq_errors} seq gaps, {foreign} frames of another user, "
              f"{lost} sockets lost during the run")
        print(f"server CPU under load    {cpu:.0f} % of one core")
        print(f"load clients CPU         {client_cpu / wall * 100:.0f} % of one core "
              f"({args.loaders} processes)")
        return 0
    finally:
        server.terminate()
        if pipeline is not None:
            pipeline.send_signal(signal.SIGTERM)
        for child in (server, pipeline):
            if child is None:
                continue
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        data_dir.cleanup()
        launcher.delete_topics(settings)


def print_live(args: argparse.Namespace, settings: Settings, sent_at: SentAt,
               samples: list[StatsSample], produced: list[tuple[int, int]],
               counters: dict[str, float], wall: float) -> None:
    events, synthetic = produced[0] if produced else (0, 0)
    result = live_latencies(sent_at, samples, settings.window_seconds * 1000)
    prov, final, close = result["provisional"], result["final"], result["close"]
    users = len({user for user, _, _ in sent_at})
    print(f"live: produced           {events} usage events ({events / args.seconds:,.0f}/s) "
          f"for {users} users x {len(args.services.split(','))} services; finals from "
          f"{args.finals}" + (f" ({synthetic} records)" if args.finals == "synthetic" else ""))
    print(f"live: frames received    {result['provisional_frames']} provisional "
          f"({result['provisional_frames'] / wall:,.0f}/s), "
          f"{result['frames'] - result['provisional_frames']} final; "
          f"{result['after_final']} provisional after a final (must be 0); the final "
          f"count equals the last provisional one and the events produced in "
          f"{result['agreed']} / {result['windows_final']} windows")
    print(f"live: event→provisional  p50 {pct(prov, 0.5) * 1000:.0f} ms, "
          f"p99 {pct(prov, 0.99) * 1000:.0f} ms, max {max(prov or [0]) * 1000:.0f} ms "
          f"(target p99 ≤ 1,500 ms); {result['uncovered']} events never in a provisional "
          "frame")
    by_second = result["by_second"]
    print("  p99 by the event's second in its window (the previous window's finals come "
          f"in second {settings.allowed_lateness_seconds % settings.window_seconds}): " +
          ", ".join(f"{k}: {pct(v, 0.99) * 1000:.0f}" for k, v in sorted(by_second.items())))
    built = result["provisional_built"]
    print(f"  of which event→bridge   p50 {pct(built, 0.5) * 1000:.0f} ms, "
          f"p99 {pct(built, 0.99) * 1000:.0f} ms (the frame's ts: when the bridge built it)")
    print(f"live: event→final        p50 {pct(final, 0.5) * 1000:.0f} ms, "
          f"p99 {pct(final, 0.99) * 1000:.0f} ms; window end→final p50 "
          f"{pct(close, 0.5) * 1000:.0f} ms, p99 {pct(close, 0.99) * 1000:.0f} ms "
          f"(lateness {settings.allowed_lateness_seconds} s; {result['windows_final']} / "
          f"{result['windows']} windows final)")
    built = result["close_built"]
    print(f"  of which window end→bridge p50 {pct(built, 0.5) * 1000:.0f} ms, "
          f"p99 {pct(built, 0.99) * 1000:.0f} ms")
    print("live: bridge counters    " + ", ".join(
        f"{name.removeprefix('live_')} {value:,.0f}" for name, value in sorted(counters.items())))

if __name__ == "__main__":
    sys.exit(main())

"""WebSocket bridge benchmark: N authenticated connections to one `keypulse ws` process.

    .venv/bin/python bench/ws.py [--connections 10000] [--rate 1000] [--seconds 20]

Starts `keypulse ws` (a subprocess) against the broker at KEYPULSE_KAFKA_BOOTSTRAP with a
fresh topic prefix, opens the connections from two load processes (websockets' asyncio
client), then produces `--rate` per-user notifications per second plus one broadcast
per second and prints: connections reached, connect rate, server RSS per 1,000
connections, p50/p99 latency from Kafka produce to client receive, and CPU.
Raises its own (and the server's) open-file limit. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import resource
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.kafka import launcher  # noqa: E402
from keypulse.auth import mint_token  # noqa: E402
from keypulse.kafka import producer_config  # noqa: E402
from keypulse.settings import Settings, load  # noqa: E402
from schemas.notifications import Notification, NotificationType  # noqa: E402


class _Data(msgspec.Struct):
    data: dict[str, str] = {}


class _Frame(msgspec.Struct):
    event: str
    data: _Data


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


def client_main(url: str, users: list[str], settings: Settings, out: mp.Queue,
                stop: mp.Event, ready: mp.Event) -> None:  # type: ignore[type-arg]
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_client(url, users, settings, out, stop, ready))


async def _client(url: str, users: list[str], settings: Settings,
                  out: mp.Queue, stop: mp.Event, ready: mp.Event) -> None:  # type: ignore[type-arg]
    from websockets.asyncio.client import connect

    decoder = msgspec.json.Decoder(_Frame)
    latencies: list[float] = []
    broadcasts = [0]
    conns = []
    sem = asyncio.Semaphore(100)
    failures = [0]

    async def open_one(user: str) -> None:
        token = mint_token(settings, user, ttl_seconds=3600)
        async with sem:
            for _ in range(3):
                try:
                    ws = await connect(url, open_timeout=30, compression=None, max_queue=64,
                                       ping_interval=None)
                    await ws.send(f'{{"event":"authenticate","data":{{"token":"{token}"}}}}')
                    await ws.recv()
                    conns.append(ws)
                    return
                except Exception:
                    await asyncio.sleep(0.5)
            failures[0] += 1

    started = time.time()
    await asyncio.gather(*(open_one(u) for u in users))
    out.put(("connected", len(conns), time.time() - started, failures[0]))
    ready.set()

    async def reader(ws) -> None:  # type: ignore[no-untyped-def]
        try:
            async for text in ws:
                now = time.time()
                frame = decoder.decode(text)
                sent = frame.data.data.get("t")
                if sent is not None:
                    if frame.event == "system_notification":
                        broadcasts[0] += 1
                    else:
                        latencies.append(now - float(sent))
        except Exception:
            return

    tasks = [asyncio.create_task(reader(ws)) for ws in conns]
    while not stop.is_set():
        await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    out.put(("latencies", latencies, broadcasts[0]))
    for ws in conns:
        ws.transport.abort()


# -- producer and measurement (parent) --------------------------------------------------------


def produce(settings: Settings, users: list[str], rate: int, seconds: float) -> tuple[int, int]:
    from confluent_kafka import Producer

    producer = Producer(producer_config(settings, **{"linger.ms": 1}))
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
        url = f"ws://127.0.0.1:{port}/ws"
        out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        stop = mp.Event()
        loaders = []
        readies = []
        started = time.time()
        for k in range(args.loaders):
            ready = mp.Event()
            p = mp.Process(target=client_main,
                           args=(url, users[k::args.loaders], settings, out, stop, ready))
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
        sent, broadcasts = produce(settings, users, args.rate, args.seconds)
        time.sleep(2.0)
        cpu1 = proc.cpu_times()
        wall = time.time() - t0
        rss_loaded = proc.memory_info().rss
        stop.set()
        latencies: list[float] = []
        received_broadcasts = 0
        for _ in loaders:
            kind, lat, bc = out.get(timeout=120)
            latencies.extend(lat)
            received_broadcasts += bc
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
        print(f"server CPU under load    {cpu:.0f} % of one core")
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

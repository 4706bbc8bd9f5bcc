"""HTTP API benchmark, ingest half: events/s accepted by `POST /v1/events` with the pipeline
running. Runs against the local broker (`keypulse kafka start`).

    python bench/api.py [--seconds 20] [--batch 500]

Starts `keypulse run` (pipeline, API and bridge in one process, its own data directory and
topic prefix) and, from this one client process, posts batches of realistic events over
`--connections` HTTP/1.1 keep-alive connections (one thread each) with an `ingest` token, each
batch answered only once Kafka confirmed it. The batches are generated before the clock starts
(distinct events, stamped at generation). Prints accepted events/s, the p50/p99 of a batch's
round trip, and the server's CPU and RSS. (The query half of the issue's benchmark comes with
the analytics routes.)
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

from core.auth import INGEST_ROLE, mint_token
from core.settings import load
from infra.kafka import launcher
from keypulse.traffic import TrafficGenerator

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    msg = "keypulse run did not become healthy"
    raise SystemExit(msg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--max-rate", type=int, default=40_000,
                        help="events generated up front: seconds x this")
    args = parser.parse_args()

    base = load()
    if not launcher.is_up(base):
        print(launcher.start(base, wait_seconds=120))
    settings = base.model_copy(update={"topic_prefix": f"bench{uuid.uuid4().hex[:6]}."})
    launcher.ensure_topics(settings)
    data_dir = Path(tempfile.mkdtemp(prefix="keypulse-bench-api-"))
    port = free_port()
    env = {**os.environ, "KEYPULSE_DEV": "1", "KEYPULSE_DATA_DIR": str(data_dir),
           "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix,
           "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
    with (data_dir / "run.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "keypulse.cli", "run", "--host", "127.0.0.1",
             "--port", str(port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port)
        token = mint_token(settings, "bench-ingest", roles=(INGEST_ROLE,), ttl_seconds=3600)
        gen = TrafficGenerator(seed=7, users=1000)
        now_ms = int(time.time() * 1000)
        events = gen.events(int(args.seconds * args.max_rate), now_ms, step_ms=0.02)
        bodies: list[bytes] = []
        while True:
            chunk = [value for _, value in itertools.islice(events, args.batch)]
            if not chunk:
                break
            bodies.append(b"[" + b",".join(chunk) + b"]")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        process = psutil.Process(server.pid)
        process.cpu_percent(None)
        lock = threading.Lock()
        next_body = iter(bodies)
        totals = {"accepted": 0, "rejected": 0, "batches": 0, "errors": 0}
        trips: list[float] = []
        started = time.perf_counter()

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while time.perf_counter() - started < args.seconds:
                with lock:
                    body = next(next_body, None)
                if body is None:
                    return
                sent = time.perf_counter()
                conn.request("POST", "/v1/events", body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                trip = time.perf_counter() - sent
                with lock:
                    trips.append(trip)
                    if response.status != 202:
                        totals["errors"] += 1
                        print(f"unexpected {response.status}: {answer[:300]!r}", file=sys.stderr)
                        return
                    result = json.loads(answer)
                    totals["accepted"] += result["accepted"]
                    totals["rejected"] += len(result["rejected"])
                    totals["batches"] += 1

        threads = [threading.Thread(target=client) for _ in range(args.connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        cpu = process.cpu_percent(None)
        rss = process.memory_info().rss
        trips.sort()
        print("--- keypulse ingest benchmark (POST /v1/events, pipeline running) ---")
        accepted, rejected = totals["accepted"], totals["rejected"]
        print(f"batches                  {totals['batches']:,} of {args.batch} events in "
              f"{elapsed:.1f} s over {args.connections} keep-alive connections")
        print(f"accepted                 {accepted / elapsed:,.0f} events/s "
              f"({accepted:,} accepted, {rejected:,} rejected; target >= 20,000/s)")
        print(f"batch round trip         p50 {trips[len(trips) // 2] * 1000:.1f} ms, "
              f"p99 {trips[min(len(trips) - 1, int(len(trips) * 0.99))] * 1000:.1f} ms")
        print(f"server                   {cpu:.0f} % of one core, RSS {rss / 2**20:.0f} MiB "
              "(pipeline + API + bridge)")
        return 1 if totals["errors"] else 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        launcher.delete_topics(settings)


if __name__ == "__main__":
    sys.exit(main())

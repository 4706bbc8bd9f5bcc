"""HTTP API benchmark: ingest (events/s accepted by `POST /v1/events` with the pipeline running)
and queries (p50/p99 of a dashboard's analytics queries on a store of 10M events).

    python bench/api.py [--part ingest|queries|all] [options]

Ingest (`--seconds 20 --batch 500 --connections 1`): runs against the local broker (`keypulse
kafka start`). Starts `keypulse run` (pipeline, API and bridge in one process, its own data
directory and topic prefix) and, from this one client process, posts batches of realistic
events over `--connections` HTTP/1.1 keep-alive connections (one thread each) with an `ingest`
token, each batch answered only once Kafka confirmed it. The batches are generated before the
clock starts (distinct events, stamped at generation). Prints accepted events/s, the p50/p99 of
a batch's round trip, and the server's CPU and RSS.

Queries (`--events 10000000 --users 1000 --requests 200 --warmup 20 [--data-dir DIR]`):
bench/store.py generates the store in a child process (events, 10 s stats, 1 m/1 h/1 d
rollups, all in ClickHouse SQL; then OPTIMIZE TABLE ... FINAL), unless `--data-dir` already
holds one (then it is reused: generate once, measure often). Then `keypulse api` serves that
store and one keep-alive connection times rounds of a dashboard's four queries (summary 24 h,
time series 24 h at 1 m, 30 d at 1 h, breakdown by API key 24 h) for a typical user (the median
by events) and the heaviest, with a `user` token. After the server stopped, the same four
calls through api.analytics in this process, without HTTP (wall and CPU time). A temporary
store is removed at the end; one in `--data-dir` stays.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil

from core.auth import INGEST_ROLE, USER_ROLE, mint_token
from core.settings import Settings, load
from infra.kafka import launcher
from keypulse.traffic import TrafficGenerator

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, timeout: float = 90.0, server: subprocess.Popen[bytes] | None = None,
                 name: str = "keypulse run", log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            msg = f"{name} exited with {server.returncode} (see {log})"
            raise SystemExit(msg)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    msg = f"{name} did not become healthy (see {log})"
    raise SystemExit(msg)


def ingest(args: argparse.Namespace) -> int:
    """Accepted events/s of `POST /v1/events` with the pipeline running."""
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



# (label, path, range in hours, parameters): one dashboard's panels
QUERIES: tuple[tuple[str, str, int, dict[str, str]], ...] = (
    ("summary, 24 h", "/v1/usage/summary", 24, {}),
    ("timeseries 1 m, 24 h", "/v1/usage/timeseries", 24, {"interval": "1m"}),
    ("timeseries 1 h, 30 d", "/v1/usage/timeseries", 30 * 24, {"interval": "1h"}),
    ("breakdown api_key, 24 h", "/v1/usage/breakdown", 24, {"by": "api_key"}),
)
TARGET_P99_MS = 50.0


def store(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The generated store: reused from `--data-dir` when it holds one, else generated there
    (or in a temporary directory) by bench/store.py in a child process, which closes the
    embedded engine when it exits (chDB admits one process per path)."""
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="keypulse-bench-queries-",
                                                      dir=args.tmp_dir))
    described = data_dir / "bench-store.json"
    if described.exists():
        print(f"reusing the store in {data_dir}", file=sys.stderr)
        return data_dir, json.loads(described.read_text())
    if (data_dir / "clickhouse").exists():
        msg = f"{data_dir} holds a store that bench/store.py did not finish: remove it first"
        raise SystemExit(msg)
    command = [sys.executable, str(REPO / "bench" / "store.py"), "--data-dir", str(data_dir),
               "--events", str(args.events), "--users", str(args.users), "--days", "30"]
    if not args.optimize:
        command.append("--no-optimize")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, check=True)
    summary: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    summary["generation_wall_s"] = round(time.perf_counter() - started, 1)
    described.write_text(json.dumps(summary))
    return data_dir, summary


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest rank."""
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]


def queries(args: argparse.Namespace) -> int:
    """p50/p99 of a dashboard's queries for one user, over HTTP against `keypulse api`."""
    data_dir, summary = store(args)
    summary["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    settings = load(dev=True, data_dir=data_dir, clickhouse_dsn="")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KEYPULSE_CLICKHOUSE_DSN"}
    env.update({"KEYPULSE_DEV": "1", "KEYPULSE_DATA_DIR": str(data_dir)})
    with (data_dir / "api.log").open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "keypulse.cli", "api", "--host", "127.0.0.1",
             "--port", str(port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    failures = 0
    try:
        wait_healthy(port, server=server, name="keypulse api", log=data_dir / "api.log")
        # An unaligned instant just after the data's end: a dashboard's "now".
        to_ms = summary["end_s"] * 1000 + 12_345
        users = (("typical", summary["typical"]), ("heaviest", summary["heaviest"]))
        results: list[tuple[str, str, list[float], int]] = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for role, user in users:
            token = mint_token(settings, user["user_id"], roles=(USER_ROLE,), ttl_seconds=3600)
            headers = {"Authorization": f"Bearer {token}"}
            targets = [
                (label, path + "?" + urlencode({"from": to_ms - hours * 3_600_000,
                                                "to": to_ms, **extra}))
                for label, path, hours, extra in QUERIES]
            trips: dict[str, list[float]] = {label: [] for label, _ in targets}
            sizes: dict[str, int] = {}
            # Rounds of the whole dashboard, as a dashboard refreshes; the first ones warm up.
            for round_ in range(args.warmup + args.requests):
                for label, target in targets:
                    sent = time.perf_counter()
                    conn.request("GET", target, headers=headers)
                    response = conn.getresponse()
                    body = response.read()
                    trip = (time.perf_counter() - sent) * 1000
                    if response.status != 200:
                        failures += 1
                        print(f"{label}: {response.status} {body[:300]!r}", file=sys.stderr)
                        continue
                    sizes[label] = len(body)
                    if round_ >= args.warmup:
                        trips[label].append(trip)
            for label, _ in targets:
                results.append((role, label, sorted(trips[label]), sizes.get(label, 0)))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    # The server has closed the store: the same queries in this process, without HTTP.
    try:
        direct = in_process(settings, summary, to_ms, args) if args.in_process else {}
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    report_queries(summary, args, results, direct)
    met = all(t and percentile(t, 0.99) <= TARGET_P99_MS for _, _, t, _ in results)
    return 1 if failures else (0 if met or not args.strict else 2)


def in_process(settings: Settings, summary: dict[str, Any], to_ms: int,
               args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    """The four queries through api.analytics on the store opened here (what the routes
    call, with the spans they compute): ClickHouse plus the Python around it, no HTTP. Also
    the CPU time each took (this process's, the embedded engine's threads included), which
    other load on the machine does not inflate as it does the wall time."""
    # Run as a script, this file's folder comes first on sys.path and its name shadows the
    # `api` package: look the package up without it.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    from api import analytics
    from api.params import Interval
    from core.clickhouse import shared_client

    client = shared_client(settings)
    db = settings.clickhouse_database
    window_ms = settings.window_seconds * 1000
    day_ms = 24 * 3_600_000
    timings: dict[tuple[str, str], list[float]] = {}
    for role in ("typical", "heaviest"):
        user_id = summary[role]["user_id"]
        calls: dict[str, Callable[[], object]] = {
            QUERIES[0][0]: partial(analytics.summary, client, db, user_id,
                                   analytics.snap(to_ms - day_ms, to_ms, window_ms)),
            QUERIES[1][0]: partial(analytics.timeseries, client, db, user_id,
                                   analytics.snap(to_ms - day_ms, to_ms, Interval.M1.ms),
                                   Interval.M1),
            QUERIES[2][0]: partial(analytics.timeseries, client, db, user_id,
                                   analytics.snap(to_ms - 30 * day_ms, to_ms, Interval.H1.ms),
                                   Interval.H1),
            QUERIES[3][0]: partial(analytics.breakdown, client, db, user_id,
                                   analytics.snap(to_ms - day_ms, to_ms, window_ms),
                                   analytics.By.API_KEY),
        }
        for round_ in range(args.warmup + args.requests):
            for label, call in calls.items():
                started, cpu = time.perf_counter(), time.process_time()
                call()
                if round_ >= args.warmup:
                    timings.setdefault((role, label), []).append(
                        (time.perf_counter() - started) * 1000)
                    timings.setdefault((role, label + " cpu"), []).append(
                        (time.process_time() - cpu) * 1000)
    return {key: sorted(values) for key, values in timings.items()}


def report_queries(summary: dict[str, Any], args: argparse.Namespace,
                   results: list[tuple[str, str, list[float], int]],
                   direct: dict[tuple[str, str], list[float]]) -> None:
    rows = summary["rows"]
    timings = summary["timings"]
    print("--- keypulse query benchmark (GET /v1/usage/*, `keypulse api`, embedded chDB) ---")
    print(f"store     {rows['usage_events']:,} events of {summary['users']:,} users over 30 d; "
          f"{rows['usage_stats']:,} windows of 10 s; rollups 1 m {rows['usage_rollup_1m']:,}, "
          f"1 h {rows['usage_rollup_1h']:,}, 1 d {rows['usage_rollup_1d']:,} rows "
          f"(from {summary['rollups_from']})")
    print(f"generated in {timings['total_s']:.0f} s (events {timings['events_s']:.0f} s, "
          f"stats {timings['stats_s']:.0f} s, rollups "
          f"{sum(v for k, v in timings.items() if k.startswith('usage_rollup')):.0f} s, "
          f"OPTIMIZE FINAL {timings.get('optimize_s', 0):.0f} s); "
          f"{summary['store_bytes'] / 2**20:,.0f} MiB on disk "
          f"({summary['bytes_on_disk'] / 2**20:,.0f} MiB in active parts)")
    print(f"{args.requests} timed rounds of the four queries per user after {args.warmup} "
          "warm-up rounds, one keep-alive connection; in process: api.analytics called "
          "directly on the store, no HTTP (wall time, and CPU time of Python and the engine)")
    print(f"load average before the run: {summary.get('load', '?')}")
    print(f"{'user':<36} {'query':<24} {'HTTP p50':>9} {'p99':>7} {'max':>7} {'bytes':>8} "
          f"{'in-process p50':>15} {'p99':>7} {'CPU p50':>8} {'p99':>7}")
    for role, label, trips, size in results:
        user = summary[role]
        who = f"{role} {user['user_id']} ({user['events']:,} ev.)"
        if not trips:
            print(f"{who:<36} {label:<24} {'failed':>9}")
            continue
        p99 = percentile(trips, 0.99)
        mark = "" if p99 <= TARGET_P99_MS else "  > 50 ms"
        local, cpu = direct.get((role, label)), direct.get((role, label + " cpu"))
        inside = (f"{percentile(local, 0.5):15.1f} {percentile(local, 0.99):7.1f} "
                  f"{percentile(cpu, 0.5):8.1f} {percentile(cpu, 0.99):7.1f}"
                  if local and cpu else "")
        print(f"{who:<36} {label:<24} {percentile(trips, 0.5):9.1f} {p99:7.1f} "
              f"{trips[-1]:7.1f} {size:8,} {inside}{mark}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ingest", "queries", "all"), default="all")
    ingest_args = parser.add_argument_group("ingest")
    ingest_args.add_argument("--seconds", type=float, default=20.0)
    ingest_args.add_argument("--batch", type=int, default=500)
    ingest_args.add_argument("--connections", type=int, default=1)
    ingest_args.add_argument("--max-rate", type=int, default=40_000,
                             help="events generated up front: seconds x this")
    query_args = parser.add_argument_group("queries")
    query_args.add_argument("--data-dir", type=Path, default=None,
                            help="the generated store (reused when it holds one; default: a "
                                 "temporary directory)")
    query_args.add_argument("--tmp-dir", type=Path, default=None,
                            help="where a temporary store goes (about 2 GB for 10M events)")
    query_args.add_argument("--events", type=int, default=10_000_000)
    query_args.add_argument("--users", type=int, default=1000)
    query_args.add_argument("--requests", type=int, default=200, help="timed rounds per user")
    query_args.add_argument("--warmup", type=int, default=20, help="warm-up rounds per user")
    query_args.add_argument("--no-optimize", dest="optimize", action="store_false",
                            help="skip OPTIMIZE TABLE ... FINAL after generation")
    query_args.add_argument("--no-in-process", dest="in_process", action="store_false",
                            help="skip timing the queries in process after the HTTP run")
    query_args.add_argument("--strict", action="store_true",
                            help="exit 2 when a query misses the p99 target")
    args = parser.parse_args()
    status = 0
    if args.part in ("ingest", "all"):
        status = ingest(args) or status
    if args.part in ("queries", "all"):
        status = queries(args) or status
    return status


if __name__ == "__main__":
    sys.exit(main())

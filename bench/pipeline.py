"""Pipeline benchmark: end-to-end events/s against the bare-consumer ceiling, RSS, freshness,
and the cost of alert evaluation. Runs against the local broker (`keypulse kafka start`).

    python bench/pipeline.py [--events 1000000] [--keys 10000]

1. Pre-produce N realistic events (10,000 distinct (user, service) keys) to fresh topics.
2. Time a bare confluent-kafka consumer reading them all: the I/O ceiling.
3. Run `keypulse pipeline` from a cold start, without alerts and with 1,000 users x 10 rules
   (taking turns at going first), until every window's stats row is in ClickHouse (seen on
   usage.stats, which the sink writes after the ClickHouse insert); print events/s, ratio to
   the ceiling, peak RSS.
4. Freshness at half the measured rate: live traffic, p99 of (stats row visible - event
   arrival) for the earliest event of each window, against window + lateness + 1 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psutil
from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)

from core import topics
from core.kafka import PREFETCH_SETTINGS, consumer_config, producer_config
from core.kafka import produce as kafka_produce
from core.settings import Settings, load
from infra.kafka import launcher
from keypulse.traffic import TrafficGenerator
from schemas.alerts import AlertRule, Metric, Op

REPO = Path(__file__).resolve().parents[1]


def generator_for_keys(keys: int, seed: int) -> TrafficGenerator:
    """A generator whose users have about `keys` (user, service) pairs in all."""
    users = max(1, keys // 3)
    while True:
        gen = TrafficGenerator(seed=seed, users=users, ts_format="ms")
        pairs = sum(len(u.services) for u in gen.users)
        if pairs >= keys:
            return gen
        users = int(users * keys / pairs) + 1


def produce(settings: Settings, topic: str, messages: Any, total: int) -> float:
    producer = Producer(producer_config(settings, **{"linger.ms": 20}))
    name = settings.topic(topic)
    started = time.perf_counter()
    for n, (key, value) in enumerate(messages, 1):
        kafka_produce(producer, name, value, key)
        if n % 200_000 == 0:
            print(f"  produced {n:,}/{total:,}", file=sys.stderr, flush=True)
    producer.flush(60)
    return time.perf_counter() - started


def topic_count(settings: Settings, topic: str) -> int:
    name = settings.topic(topic)
    consumer = Consumer(consumer_config(settings, group_id=f"bench-{uuid.uuid4().hex}"))
    parts = consumer.list_topics(name, timeout=10).topics[name].partitions
    total = 0
    for p in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
        total += high - low
    consumer.close()
    return total


def bare_consumer(settings: Settings, total: int, **overrides: Any) -> float:
    name = settings.topic(topics.USAGE_EVENTS)
    consumer = Consumer(consumer_config(settings, group_id=f"bench-{uuid.uuid4().hex}",
                                        **overrides))
    parts = consumer.list_topics(name, timeout=10).topics[name].partitions
    started = time.perf_counter()
    consumer.assign([TopicPartition(name, p, 0) for p in parts])
    seen = 0
    while seen < total:
        seen += sum(1 for m in consumer.consume(10_000, timeout=1.0) if m.error() is None)
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def _high_watermark(consumer: Consumer, tp: TopicPartition) -> int:
    """A new topic's leader may still be moving: retry for a while."""
    for _attempt in range(50):
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException:
            time.sleep(0.2)
    return int(consumer.get_watermark_offsets(tp, timeout=10)[1])


class StatsWatcher:
    """Follows usage.stats from the end; records when each window's row became visible."""

    def __init__(self, settings: Settings) -> None:
        name = settings.topic(topics.USAGE_STATS)
        self.consumer = Consumer(consumer_config(settings, group_id=f"bench-{uuid.uuid4().hex}"))
        parts = self.consumer.list_topics(name, timeout=10).topics[name].partitions
        ends = [_high_watermark(self.consumer, TopicPartition(name, p)) for p in parts]
        self.consumer.assign([TopicPartition(name, p, end) for p, end in zip(parts, ends,
                                                                             strict=True)])
        self.seen: dict[tuple[str, str, str], float] = {}
        self.requests = 0

    def poll(self) -> None:
        # consume() returns when it has 5,000 messages or the timeout passed: keep the timeout
        # short, or the watcher itself would add up to that much to every freshness figure.
        for message in self.consumer.consume(5000, timeout=0.02):
            if message.error() is not None:
                continue
            stats = json.loads(message.value() or b"{}")
            if stats["service"] == "closer":
                continue  # the closers' own windows close later, with idle time
            key = (stats["user_id"], stats["service"], stats["window_start"])
            if key not in self.seen:
                # When the row became queryable: the sink publishes a stats message only after
                # its ClickHouse insert returned, so the message's create time is that moment
                # (this process's own polling and parsing would add their delay otherwise).
                kind, created_ms = message.timestamp()
                self.seen[key] = (created_ms / 1000 if kind == TIMESTAMP_CREATE_TIME
                                  else time.time())
                self.requests += stats["requests"]

    def close(self) -> None:
        self.consumer.close()


def start_pipeline(settings: Settings, data_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KEYPULSE_DEV": "1", "KEYPULSE_DATA_DIR": str(data_dir),
           "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix, "KEYPULSE_CLICKHOUSE_DSN": "",
           "KEYPULSE_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "keypulse.cli", "pipeline", *extra],
                            env=env, cwd=REPO)


def peak_rss(proc: subprocess.Popen[bytes], samples: list[int]) -> None:
    """RSS of the pipeline, summed over its processes (with -p N, the cluster)."""
    try:
        ps = psutil.Process(proc.pid)
        samples.append(sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
    except psutil.Error:
        pass


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cold_run(settings: Settings, expected_windows: int, total_requests: int,
             extra: tuple[str, ...]) -> tuple[float, int]:
    """Seconds from process start to the last window visible, and peak RSS."""
    watcher = StatsWatcher(settings)
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        started = time.perf_counter()
        proc = start_pipeline(settings, Path(tmp), *extra)
        rss: list[int] = []
        next_sample = 0.0
        try:
            while len(watcher.seen) < expected_windows:
                watcher.poll()
                if time.perf_counter() >= next_sample:
                    peak_rss(proc, rss)
                    next_sample = time.perf_counter() + 0.25
                if proc.poll() is not None:
                    msg = f"pipeline exited with {proc.returncode}"
                    raise RuntimeError(msg)
                if time.perf_counter() - started > 900:
                    msg = f"timed out with {len(watcher.seen)}/{expected_windows} windows"
                    raise RuntimeError(msg)
            elapsed = time.perf_counter() - started
        finally:
            stop(proc)
            watcher.close()
    if watcher.requests != total_requests:
        msg = f"windows hold {watcher.requests:,} requests, expected {total_requests:,}"
        raise RuntimeError(msg)
    return elapsed, max(rss, default=0)


def fresh_settings(base: Settings) -> Settings:
    settings = base.model_copy(update={"topic_prefix": f"bench{uuid.uuid4().hex[:6]}."})
    launcher.ensure_topics(settings)
    return settings


# Thresholds an operator would set: they fire for the generator's unhealthy keys, not for all.
RULE_TEMPLATES = (
    (Metric.ERROR_RATE, Op.GT, 0.25), (Metric.SERVER_ERROR_RATE, Op.GT, 0.1),
    (Metric.SUCCESS_RATE, Op.LT, 0.6), (Metric.LATENCY_P50_MS, Op.GT, 1500.0),
    (Metric.LATENCY_P95_MS, Op.GT, 4000.0), (Metric.LATENCY_P99_MS, Op.GT, 8000.0),
    (Metric.LATENCY_AVG_MS, Op.GT, 2000.0), (Metric.REQUESTS, Op.GT, 5000.0),
    (Metric.COST_USD, Op.GT, 50.0), (Metric.TOKENS, Op.GT, 2_000_000.0),
)


def rules_for(users: list[str], per_user: int) -> list[tuple[bytes, bytes]]:
    out = []
    for user in users:
        for i in range(per_user):
            metric, op, threshold = RULE_TEMPLATES[i % len(RULE_TEMPLATES)]
            rule = AlertRule(rule_id=f"{user}-r{i}", user_id=user, name=f"{metric} {op} "
                             f"{threshold:g}", metric=metric, op=op, threshold=threshold,
                             for_windows=1 + i % 2, min_requests=5, version=1)
            out.append((rule.rule_id.encode(), msgspec.json.encode(rule)))
    return out


def freshness(base: Settings, rate: float, seconds: float, gen: TrafficGenerator) -> list[float]:
    """Live traffic at `rate` events/s with ts = now; seconds from each window's earliest
    event arrival to its stats row being visible."""
    settings = fresh_settings(base)
    watcher = StatsWatcher(settings)
    producer = Producer(producer_config(settings, **{"linger.ms": 5}))
    name = settings.topic(topics.USAGE_EVENTS)
    stop_flag = threading.Event()
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    # The load stands in for SDKs on other machines: generating it live took half a core of
    # this machine's two from the pipeline. Events are generated up front with a placeholder
    # time, and stamped with the time of sending.
    count = per_tick * int(seconds / tick + 1)
    print(f"  generating {count:,} events…", file=sys.stderr)
    placeholder = b'"ts":%d' % _PLACEHOLDER_MS
    pending = iter(list(gen.events(count, _PLACEHOLDER_MS)))

    def run_producer() -> None:
        next_at = time.perf_counter()
        end = next_at + seconds
        while time.perf_counter() < end:
            stamp = b'"ts":%d' % int(time.time() * 1000)
            for key, template in itertools.islice(pending, per_tick):
                value = template.replace(placeholder, stamp, 1)
                kafka_produce(producer, name, value, key, wait_seconds=0.01)
            producer.poll(0)
            next_at += tick
            time.sleep(max(0.0, next_at - time.perf_counter()))
        producer.flush(30)
        stop_flag.set()

    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        proc = start_pipeline(settings, Path(tmp))
        time.sleep(4)  # imports and migrations; freshness is measured once traffic flows
        thread = threading.Thread(target=run_producer, daemon=True)
        thread.start()
        window_s = base.window_seconds
        drain_until = None
        while drain_until is None or time.time() < drain_until:
            watcher.poll()
            if stop_flag.is_set() and drain_until is None:
                drain_until = time.time() + window_s + base.allowed_lateness_seconds + 5
        thread.join()
        stop(proc)
    watcher.close()
    lags = []
    for (_u, _s, start), visible in watcher.seen.items():
        lags.append(visible - _parse_ts(start))
    return sorted(lags)


_PLACEHOLDER_MS = 1_111_111_111_111  # 13 digits, like every time until 2286


def _parse_ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--span-seconds", type=int, default=60,
                        help="event-time span of the pre-produced events")
    parser.add_argument("--rules-users", type=int, default=1000)
    parser.add_argument("--rules-per-user", type=int, default=10)
    parser.add_argument("--freshness-seconds", type=float, default=30)
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument("--freshness-only", type=float, metavar="RATE",
                        help="only the freshness run, at RATE events/s")
    parser.add_argument("--repeat", type=int, default=2,
                        help="cold runs of each variant, interleaved; the best counts")
    parser.add_argument("--processes", type=int, default=1,
                        help="pipeline processes (a Bytewax cluster; only process 0 writes "
                             "to the embedded ClickHouse)")
    args = parser.parse_args()

    base = load(dev=True)
    if not launcher.is_up(base):
        print(launcher.start(base, wait_seconds=120))
    if args.freshness_only:
        report_freshness(base, args.freshness_only, args.freshness_seconds, args.keys)
        return
    settings = fresh_settings(base)
    window_ms = settings.window_seconds * 1000
    lateness_ms = settings.allowed_lateness_seconds * 1000

    gen = generator_for_keys(args.keys, seed=42)
    t0 = (int(time.time() * 1000) // window_ms) * window_ms - 3_600_000
    step = args.span_seconds * 1000 / args.events
    print(f"generating {args.events:,} events over {args.span_seconds} s of event time…",
          file=sys.stderr)
    messages = list(gen.events(args.events, now_ms=t0, step_ms=step))
    windows: dict[tuple[bytes, str, int], int] = {}
    decoder = msgspec.json.Decoder()
    for key, value in messages:
        event = decoder.decode(value)
        ts = event["ts"]
        windows_key = (key, event["service"], ts - ts % window_ms)
        windows[windows_key] = windows.get(windows_key, 0) + 1
    pairs = {(k[0], k[1]) for k in windows}
    # One closer per partition: an event far enough ahead that every window above closes.
    closer_ts = t0 + args.span_seconds * 1000 + window_ms + lateness_ms + 1
    closers = []
    for n in range(settings.topic_partitions * 50):
        user = f"closer-{n}"
        closers.append((user.encode(), msgspec.json.encode({
            "event_id": f"closer-{n}", "ts": closer_ts, "user_id": user, "api_key_id": "k",
            "service": "closer", "status_code": 200, "latency_ms": 1.0})))
    print(f"  {len(pairs):,} (user, service) keys, {len(windows):,} windows", file=sys.stderr)

    def setup_topics() -> Settings:
        fresh = fresh_settings(base)
        produce(fresh, topics.USAGE_EVENTS, iter(messages + closers),
                len(messages) + len(closers))
        return fresh

    cluster = ("-p", str(args.processes)) if args.processes > 1 else ()
    users = sorted({k[0].decode() for k in windows})[: args.rules_users]
    rules = rules_for(users, args.rules_per_user)
    plain_runs: list[tuple[float, int]] = []
    alert_runs: list[tuple[float, int]] = []
    ceilings: list[float] = []
    tuned: list[float] = []
    for attempt in range(args.repeat):
        # Both topic sets are written before any run (a run right after 1M events were
        # produced shares the machine with the broker flushing them), and the two variants
        # take turns at going first.
        print(f"run {attempt + 1}/{args.repeat}: producing…", file=sys.stderr)
        plain = setup_topics()
        alerting = setup_topics()
        produce(alerting, topics.ALERT_RULES, iter(rules), len(rules))
        ceilings.append(bare_consumer(plain, len(messages) + len(closers)))
        tuned.append(bare_consumer(plain, len(messages) + len(closers), **PREFETCH_SETTINGS))
        for variant in ("without", "with") if attempt % 2 == 0 else ("with", "without"):
            print(f"  cold run {variant} alerts…", file=sys.stderr)
            if variant == "without":
                plain_runs.append(cold_run(plain, len(windows), len(messages),
                                           (*cluster, "--no-alerts")))
            else:
                alert_runs.append(cold_run(alerting, len(windows), len(messages), cluster))
        launcher.delete_topics(plain)
        if attempt + 1 < args.repeat:
            launcher.delete_topics(alerting)  # the last one is counted below
    plain_s, plain_rss = min(plain_runs)
    alert_s, alert_rss = min(alert_runs)
    ceiling_s = min(ceilings)
    tuned_s = min(tuned)
    n = len(messages)
    ceiling = n / ceiling_s
    plain_rate = n / plain_s
    alert_rate = n / alert_s
    print()
    print(f"events                         {n:,} ({len(pairs):,} keys, {len(windows):,} windows)")
    print(f"bare consumer (I/O ceiling)    {ceiling:,.0f} events/s (confluent-kafka defaults)")
    print(f"  with the pipeline's fetch    {n / tuned_s:,.0f} events/s (core.kafka."
          f"PREFETCH_SETTINGS: the defaults wait 1 s whenever the prefetch queue is full)")
    print(f"pipeline end to end            {plain_rate:,.0f} events/s "
          f"(cold start to last window in ClickHouse, {plain_s:.1f} s)")
    print(f"ratio to the ceiling           {plain_rate / ceiling:.3f} "
          f"({plain_rate * tuned_s / n:.3f} of the consumer with the pipeline's fetch)")
    print(f"peak RSS                       {plain_rss / 2**20:,.0f} MiB ({plain_rss / 1e9:.3f} GB)")
    print(f"runs (s)                       without alerts {[round(r[0], 1) for r in plain_runs]}"
          f", with {[round(r[0], 1) for r in alert_runs]} (best of {args.repeat} counts)")
    print(f"with {len(users):,} users x {args.rules_per_user} rules  {alert_rate:,.0f} events/s "
          f"(alert evaluation costs {100 * (1 - alert_rate / plain_rate):.1f} %), "
          f"peak RSS {alert_rss / 2**20:,.0f} MiB, "
          f"{topic_count(alerting, topics.USAGE_ALERTS):,} alert records")
    launcher.delete_topics(alerting)
    if not args.skip_freshness:
        report_freshness(base, plain_rate / 2, args.freshness_seconds, args.keys)


def report_freshness(base: Settings, rate: float, seconds: float, keys: int) -> None:
    print(f"freshness at {rate:,.0f} events/s for {seconds:.0f} s…", file=sys.stderr)
    lags = freshness(base, rate, seconds, generator_for_keys(keys, 7))
    bound = base.window_seconds + base.allowed_lateness_seconds + 1
    print(f"freshness at {rate:,.0f} events/s    p50 {pct(lags, 0.5):.2f} s, "
          f"p99 {pct(lags, 0.99):.2f} s over {len(lags):,} windows "
          f"(target <= {bound} s = window + lateness + 1 s)")


if __name__ == "__main__":
    main()

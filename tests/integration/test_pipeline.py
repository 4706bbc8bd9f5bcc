"""The pipeline against the real broker and the embedded ClickHouse, with a known truth."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import topics
from core.settings import Settings
from tests.integration.harness import REPO, PipelineProcess, TopicReader, embedded, produce
from tests.integration.truth import STATS_FIELDS, assert_windows_equal, expected_windows

pytestmark = pytest.mark.integration

WINDOW_MS = 2000
FAST_WINDOWS = {"KEYPULSE_WINDOW_SECONDS": "2", "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1"}
SERVICES = ("openai", "stripe")


def make_event(rng: random.Random, i: int, ts: int, users: int = 6) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"evt-{i:06d}",
        "ts": ts,
        "user_id": f"user-{i % users}",
        "api_key_id": f"key-{i % 3}",
        "service": SERVICES[i % 2],
        "status_code": rng.choice([200, 200, 200, 201, 404, 429, 500, 503]),
        "latency_ms": round(rng.lognormvariate(4, 0.8), 3),
    }
    if event["service"] == "openai":
        event |= {
            "tokens_in": rng.randint(1, 500),
            "tokens_out": rng.randint(1, 900),
            "cost_usd": round(rng.random() / 100, 6),
        }
    return event


def encode(event: dict[str, Any]) -> tuple[bytes, bytes]:
    return event["user_id"].encode(), json.dumps(event).encode()


def read_tables(
    path: Path,
) -> tuple[list[tuple[Any, ...]], dict[tuple[str, str, int], Any], int]:
    """The event rows (FINAL), the stats by key, and how many raw event rows were written."""
    with embedded(path) as client:
        rows = client.query(
            "SELECT event_id, user_id, toUnixTimestamp64Milli(ts), late "
            "FROM keypulse.usage_events FINAL ORDER BY event_id"
        ).result_rows
        cols = ", ".join(STATS_FIELDS)
        stats = client.query(
            f"SELECT user_id, service, toUnixTimestamp64Milli(window_start), {cols} "
            "FROM keypulse.usage_stats FINAL"
        ).result_rows
        raw_rows = client.query("SELECT count() FROM keypulse.usage_events").result_rows[0][0]
    table = {(r[0], r[1], r[2]): dict(zip(STATS_FIELDS, r[3:], strict=True)) for r in stats}
    return [tuple(r) for r in rows], table, int(raw_rows)


def stats_keys(messages: list[Any]) -> set[tuple[str, str, str]]:
    keys = set()
    for m in messages:
        s = json.loads(m.value())
        keys.add((s["user_id"], s["service"], s["window_start"]))
    return keys


def test_known_stream_yields_exact_tables_and_dead_letters(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(11)
    t0 = (int(time.time() * 1000) // WINDOW_MS) * WINDOW_MS - 600_000
    events = [make_event(rng, i, t0 + i * 50) for i in range(600)]
    # out of order within the lateness: swap neighbours up to 500 ms apart
    order = list(range(len(events)))
    for i in range(0, len(order) - 10, 10):
        j = i + rng.randint(1, 9)
        order[i], order[j] = order[j], order[i]
    stream = [encode(events[i]) for i in order]
    duplicates = [encode(events[i]) for i in rng.sample(range(550, 600), 20)]
    bad = [
        (b"user-0", b"not json at all"),
        (b"user-1", b'{"event_id": "x1"}'),
        (
            b"user-2",
            json.dumps({**events[0], "event_id": "bad-status", "status_code": 99}).encode(),
        ),
        (
            b"user-3",
            json.dumps({**events[0], "event_id": "bad-svc", "service": "Open AI"}).encode(),
        ),
        (b"user-4", b'{"event_id": "\xff\xfe"}'),
    ]
    late = [make_event(rng, 900 + k, t0 + 1000 + k, users=1) for k in range(3)]
    for k, e in enumerate(late):
        e["event_id"] = f"late-{k}"
    produce(
        kafka_settings, topics.USAGE_EVENTS, stream + duplicates + bad + [encode(e) for e in late]
    )

    expected = expected_windows(events, WINDOW_MS)
    pipeline = PipelineProcess(kafka_settings, tmp_path, **FAST_WINDOWS)
    pipeline.start()
    stats_reader = TopicReader(kafka_settings, topics.USAGE_STATS)
    dlq_reader = TopicReader(kafka_settings, topics.USAGE_EVENTS_DLQ)
    try:
        stats_reader.read_until(
            lambda ms: len(stats_keys(ms)) >= len(expected),
            timeout=120,
            check=pipeline.assert_alive,
        )
        dead = dlq_reader.read_until(lambda ms: len(ms) >= len(bad), timeout=30)
    finally:
        assert pipeline.stop() == 0
        stats_reader.close()
        dlq_reader.close()

    rows, stats, raw_rows = read_tables(tmp_path / "clickhouse")
    want_rows = sorted(
        [(e["event_id"], e["user_id"], e["ts"], False) for e in events]
        + [(e["event_id"], e["user_id"], e["ts"], True) for e in late]
    )
    assert sorted(rows) == want_rows
    # Without a crash nothing is written twice: no duplicate raw row waits for a merge.
    assert raw_rows == len(want_rows)
    assert_windows_equal(stats, expected)

    got_dead = sorted((m.value(), dict(m.headers())) for m in dead)
    assert [v for v, _ in got_dead] == sorted(v for _, v in bad)  # original bytes
    reasons = {v: h["keypulse.reason"].decode() for v, h in got_dead}
    assert reasons[b"not json at all"].startswith("event: not valid JSON")
    assert reasons[b'{"event_id": "x1"}'] == "ts: required field missing"
    assert reasons[bad[2][1]] == "status_code: expected `int` >= 100"
    assert reasons[bad[4][1]] == "event_id: invalid UTF-8 at byte 14"
    for _, headers in got_dead:
        assert (
            headers["keypulse.source.topic"] == kafka_settings.topic(topics.USAGE_EVENTS).encode()
        )
        assert int(headers["keypulse.source.offset"]) >= 0


@pytest.mark.slow
def test_kill_9_three_times_loses_nothing_and_counts_nothing_twice(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Live traffic while the pipeline is killed -9 at random moments and restarted."""
    rng = random.Random(5)
    pipeline = PipelineProcess(kafka_settings, tmp_path, **FAST_WINDOWS)
    pipeline.start()
    events: list[dict[str, Any]] = []
    kills = 0
    next_kill = time.monotonic() + rng.uniform(2, 5)
    deadline = time.monotonic() + 24
    i = 0
    while time.monotonic() < deadline:
        now_ms = int(time.time() * 1000)
        chunk = [make_event(rng, i + k, now_ms, users=8) for k in range(40)]
        i += len(chunk)
        events.extend(chunk)
        messages = [encode(e) for e in chunk]
        messages += [encode(e) for e in rng.sample(events[-200:], 3)]  # redeliveries
        produce(kafka_settings, topics.USAGE_EVENTS, messages)
        if kills < 3 and time.monotonic() >= next_kill:
            pipeline.kill9()
            kills += 1
            time.sleep(rng.uniform(0.2, 1.5))  # down for a while; traffic keeps flowing
            pipeline.start()
            next_kill = time.monotonic() + rng.uniform(2, 5)
        time.sleep(0.1)
    assert kills == 3

    expected = expected_windows(events, WINDOW_MS)
    reader = TopicReader(kafka_settings, topics.USAGE_STATS)
    try:
        reader.read_until(
            lambda ms: len(stats_keys(ms)) >= len(expected),
            timeout=120,
            check=pipeline.assert_alive,
        )
    finally:
        assert pipeline.stop() == 0
        reader.close()
    rows, stats, _raw_rows = read_tables(tmp_path / "clickhouse")  # replays may repeat rows
    assert sorted(r[0] for r in rows) == sorted(e["event_id"] for e in events)
    assert not any(r[3] for r in rows)  # nothing was mistaken for late
    assert_windows_equal(stats, expected)


# -- death is loud: `keypulse pipeline` always stops, `keypulse run` exits with its pipeline --

# The CLI with a fault injected into the dataflow's processor at its first batch of records.
FAULTY = """
import os, sys, time
import pipeline.processor as processor

fault = os.environ["KEYPULSE_TEST_FAULT"]
original = processor.PartitionProcessor.on_batch

def on_batch(self, values):
    if fault and any(getattr(v, "records", None) for v in values):
        print("fault:", fault, file=sys.stderr, flush=True)
        if fault == "panic":
            raise RuntimeError("injected fault")
        while True:  # stuck
            time.sleep(1)
    return original(self, values)

processor.PartitionProcessor.on_batch = on_batch
from keypulse.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Keypulse:
    """A `keypulse` command in a child process (with `fault` injected), its log in a file."""

    def __init__(self, settings: Settings, data_dir: Path, *args: str, fault: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPULSE_")}
        env |= {"KEYPULSE_DEV": "1", "KEYPULSE_DATA_DIR": str(data_dir),
                "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix, "KEYPULSE_LOG_LEVEL": "INFO",
                "KEYPULSE_TEST_FAULT": fault, "PYTHONFAULTHANDLER": "1", **FAST_WINDOWS}
        self.log = data_dir / "keypulse.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", FAULTY, *args], env=env,
                                         cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.log.read_text()}")
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.log.read_text()}"
            time.sleep(0.1)

    def exit_code(self, within: float) -> int:
        try:
            return self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"still running after {within} s:\n{self.log.read_text()}")\
                from None


def _some_events(settings: Settings) -> None:
    rng = random.Random(3)
    now_ms = int(time.time() * 1000)
    produce(settings, topics.USAGE_EVENTS, [encode(make_event(rng, i, now_ms)) for i in range(20)])


def test_sigterm_stops_the_pipeline_cleanly(kafka_settings: Settings, tmp_path: Path) -> None:
    _some_events(kafka_settings)
    pipeline = Keypulse(kafka_settings, tmp_path, "pipeline", "--epoch-seconds", "1")
    pipeline.wait_for("reading ")
    pipeline.proc.send_signal(signal.SIGTERM)
    assert pipeline.exit_code(within=15) == 0
    log = pipeline.log.read_text()
    assert "SIGTERM: stopping after the current batch" in log
    assert "pipeline stopped; the next start resumes where it stopped" in log


def test_sigterm_ends_a_stuck_pipeline_after_the_stop_timeout(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    _some_events(kafka_settings)
    pipeline = Keypulse(kafka_settings, tmp_path, "pipeline", "--stop-timeout", "2",
                        fault="stuck")
    pipeline.wait_for("fault: stuck")
    pipeline.proc.send_signal(signal.SIGTERM)
    assert pipeline.exit_code(within=10) == 128 + signal.SIGTERM
    assert "still running 2 s after SIGTERM: exiting now (exit 143)" in pipeline.log.read_text()


def test_a_second_signal_ends_a_stuck_pipeline_at_once(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    _some_events(kafka_settings)
    pipeline = Keypulse(kafka_settings, tmp_path, "pipeline", "--stop-timeout", "600",
                        fault="stuck")
    pipeline.wait_for("fault: stuck")
    pipeline.proc.send_signal(signal.SIGTERM)
    pipeline.wait_for("SIGTERM: stopping after the current batch")
    pipeline.proc.send_signal(signal.SIGINT)
    assert pipeline.exit_code(within=5) == 128 + signal.SIGINT
    assert "SIGINT again: exiting now (exit 130)" in pipeline.log.read_text()


def test_a_pipeline_whose_dataflow_fails_exits_1_by_itself(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    _some_events(kafka_settings)
    pipeline = Keypulse(kafka_settings, tmp_path, "pipeline", fault="panic")
    pipeline.wait_for("fault: panic")
    assert pipeline.exit_code(within=20) == 1
    said = pipeline.log.read_text().strip().splitlines()[-1]
    assert said.endswith(" ERROR pipeline.runner: pipeline: the dataflow failed: "
                         "RuntimeError: injected fault (exit 1)")


def test_run_exits_1_when_its_pipeline_dies(kafka_settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = Keypulse(kafka_settings, tmp_path, "run", "--port", str(port), fault="panic")
    run.wait_for("Application startup complete")
    healthz = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    _some_events(kafka_settings)
    assert run.exit_code(within=30) == 1
    log = run.log.read_text()
    assert "pipeline stopped: " in log
    assert "injected fault: stopping the server (exit 1)" in log

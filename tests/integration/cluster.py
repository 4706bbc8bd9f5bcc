"""Helpers for the scale-out tests: a golden stream with its oracle, `keypulse pipeline`
processes as one Bytewax cluster, and every ClickHouse table the dataflow writes, dumped.

The golden stream is built in waves far apart in event time (`WAVE_GAP_MS`): a pipeline that
caught up with one wave and idled moves its watermark with wall time, and the gap keeps the
next wave on time however long the test waited in between, so every run, crashed or not,
must compute the same thing.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from core import topics
from core.settings import Settings
from infra.kafka import launcher
from schemas.notifications import Notification, NotificationRead, NotificationType
from tests.integration.harness import REPO, TopicReader, embedded, free_port, produce
from tests.integration.truth import expected_windows

WINDOW_MS = 2000
ENV = {
    "KEYPULSE_WINDOW_SECONDS": "2",
    "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1",
    "KEYPULSE_PIPELINE_HTTP_PORT": "0",
}
USERS = ("ana", "ben", "cy", "dee")
SERVICES = ("openai", "stripe")
WINDOWS_PER_WAVE = 12
PER_WINDOW = 24  # events per (user, service, window): above the default rules' min_requests 20
WAVE_GAP_MS = 300_000
# (user, service, window of the wave) → what goes wrong there, so that the default rules fire:
# error_rate > 0.05 and latency_p95_ms > 2000, each for 2 windows.
ERRORS = {("ana", "openai", 3), ("ana", "openai", 4), ("cy", "stripe", 7), ("cy", "stripe", 8)}
SLOW = {("ben", "stripe", 5), ("ben", "stripe", 6)}

Message = tuple[bytes | None, bytes]

# Columns the server stamps at insert time (the version columns of ReplacingMergeTree).
STAMPED = frozenset({"ingested_at", "emitted_at", "computed_at"})


@dataclass
class Golden:
    """A deterministic stream in waves, and what the tables must hold after it."""

    waves: int = 3
    t0: int = field(
        default_factory=lambda: (int(time.time() * 1000) // 60_000) * 60_000 - 1_200_000
    )
    events: list[dict[str, Any]] = field(default_factory=list)
    messages: list[list[Message]] = field(default_factory=list)
    bad: list[Message] = field(default_factory=list)
    late: list[dict[str, Any]] = field(default_factory=list)
    records: list[list[Message]] = field(default_factory=list)
    notes: list[Notification] = field(default_factory=list)
    reads: list[NotificationRead] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(2026)
        for wave in range(self.waves):
            start = self.t0 + wave * WAVE_GAP_MS
            batch: list[dict[str, Any]] = []
            for w in range(WINDOWS_PER_WAVE):
                for user in USERS:
                    for service in SERVICES:
                        batch += [
                            self._event(rng, wave, user, service, w, start + w * WINDOW_MS, i)
                            for i in range(PER_WINDOW)
                        ]
            batch.sort(key=lambda e: (e["ts"], e["event_id"]))
            # out of order within the lateness: swap neighbours up to a few hundred ms apart
            for i in range(0, len(batch) - 10, 10):
                j = i + rng.randint(1, 9)
                batch[i], batch[j] = batch[j], batch[i]
            self.events += batch
            wire = [encode(e) for e in batch]
            wire += [encode(e) for e in rng.sample(batch, 15)]  # redeliveries: counted once
            wire += self._bad(wave)
            # after the wave, far behind its watermark: stored, flagged late, in no window
            late = [
                dict(batch[k], event_id=f"late-{wave}-{k}", ts=start + 500 + k) for k in range(3)
            ]
            self.late += late
            wire += [encode(e) for e in late]
            self.messages.append(wire)
            self.records.append(self._platform_records(wave))

    def _event(
        self, rng: random.Random, wave: int, user: str, service: str, w: int, start: int, i: int
    ) -> dict[str, Any]:
        status = rng.choice([200, 200, 201, 204])
        if (user, service, w) in ERRORS and i % 4 == 0:
            status = 503
        latency = round(rng.lognormvariate(4, 0.6), 3)
        if (user, service, w) in SLOW and i % 5 != 0:
            latency += 2500.0
        event: dict[str, Any] = {
            "event_id": f"w{wave}-{user}-{service}-{w}-{i}",
            "ts": start + i * (WINDOW_MS // PER_WINDOW),
            "user_id": user,
            "api_key_id": f"{user}-key",
            "service": service,
            "status_code": status,
            "latency_ms": latency,
        }
        if service == "openai":
            event |= {
                "tokens_in": rng.randint(1, 500),
                "tokens_out": rng.randint(1, 900),
                "cost_usd": round(rng.random() / 100, 6),
            }
        return event

    def _bad(self, wave: int) -> list[Message]:
        bad: list[Message] = [
            (b"ana", f"not json {wave}".encode()),
            (b"ben", json.dumps({"event_id": f"no-ts-{wave}"}).encode()),
            (
                b"cy",
                json.dumps(
                    {
                        "event_id": f"bad-status-{wave}",
                        "ts": self.t0,
                        "user_id": "cy",
                        "api_key_id": "k",
                        "service": "openai",
                        "status_code": 99,
                        "latency_ms": 1,
                    }
                ).encode(),
            ),
        ]
        self.bad += bad
        return bad

    def _platform_records(self, wave: int) -> list[Message]:
        """Notifications and read states as the API produces them, a few per wave."""
        out: list[Message] = []
        for k, user in enumerate(USERS):
            at = self.t0 + wave * WAVE_GAP_MS + k
            note = Notification(
                notification_id=f"note-{wave}-{user}",
                user_id=user,
                type=NotificationType.INFO,
                template="announcement",
                title=f"wave {wave}",
                message=f"hello {user}",
                created_at=_utc(at),
                data={"title": f"wave {wave}"},
            )
            self.notes.append(note)
            out.append((user.encode(), msgspec.json.encode(note)))
            if k % 2 == 0:
                read = NotificationRead(
                    notification_id=note.notification_id, user_id=user, read=True, at=_utc(at + 1)
                )
                self.reads.append(read)
                out.append((user.encode(), msgspec.json.encode(read)))
        return out

    def send(self, settings: Settings, wave: int) -> None:
        produce(settings, topics.USAGE_EVENTS, self.messages[wave])
        produce(settings, topics.NOTIFICATIONS, self.records[wave])

    # -- the oracle ---------------------------------------------------------------------------

    def windows(self) -> dict[tuple[str, str, int], dict[str, float]]:
        return expected_windows(self.events, WINDOW_MS)

    def alerts(self) -> list[tuple[str, str, str, int]]:
        """(rule_id, state, service, window_start) of every alert the default rules raise: an
        episode of two bad windows fires (for_windows 2) with the first window's start and
        resolves with the next clean window's."""
        out = []
        for wave in range(self.waves):
            start = self.t0 + wave * WAVE_GAP_MS
            for episode, metric in ((ERRORS, "error_rate"), (SLOW, "latency_p95_ms")):
                keys = sorted({(u, s) for u, s, _ in episode})
                for user, service in keys:
                    ws = sorted(w for u, s, w in episode if (u, s) == (user, service))
                    rule = f"default:{user}:{metric}"
                    out.append((rule, "firing", service, start + ws[0] * WINDOW_MS))
                    out.append((rule, "resolved", service, start + (ws[-1] + 1) * WINDOW_MS))
        return sorted(out)

    def event_rows(self) -> list[tuple[str, str, int, bool]]:
        return sorted(
            [(e["event_id"], e["user_id"], e["ts"], False) for e in self.events]
            + [(e["event_id"], e["user_id"], e["ts"], True) for e in self.late]
        )


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def encode(event: dict[str, Any]) -> Message:
    return event["user_id"].encode(), json.dumps(event).encode()


@contextmanager
def second_prefix(settings: Settings, prefix: str) -> Iterator[Settings]:
    """The test's settings with topics of another prefix of its own, deleted after."""
    other = settings.model_copy(update={"topic_prefix": prefix})
    launcher.ensure_topics(other)
    try:
        yield other
    finally:
        launcher.delete_topics(other)


# -- processes ------------------------------------------------------------------------------


class Cluster:
    """`keypulse pipeline` processes, one Bytewax cluster over one data directory: with one
    process a plain `keypulse pipeline`, else `--addresses … --process-id i` each."""

    def __init__(
        self, settings: Settings, data_dir: Path, processes: int, epoch_seconds: float = 1.0
    ) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.processes = processes
        self.epoch_seconds = epoch_seconds
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPULSE_")}
        self.env = (
            env
            | ENV
            | {
                "KEYPULSE_DEV": "1",
                "KEYPULSE_LOG_LEVEL": "INFO",
                "KEYPULSE_DATA_DIR": str(data_dir),
                "KEYPULSE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "KEYPULSE_TOPIC_PREFIX": settings.topic_prefix,
            }
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * processes
        self.addresses = ""

    def log(self, i: int) -> Path:
        return self.data_dir / f"pipeline-{self.processes}-{i}.log"

    def start(self) -> None:
        """Start every process (new ports each time: a killed process's may linger)."""
        self.addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(self.processes))
        for i in range(self.processes):
            self.start_one(i)

    def start_one(self, i: int) -> None:
        cluster = (
            [] if self.processes == 1 else ["--addresses", self.addresses, "--process-id", str(i)]
        )
        with self.log(i).open("ab") as out:
            self.procs[i] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "keypulse.cli",
                    "pipeline",
                    "--epoch-seconds",
                    str(self.epoch_seconds),
                    "--stop-timeout",
                    "20",
                    *cluster,
                ],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def proc(self, i: int) -> subprocess.Popen[bytes]:
        proc = self.procs[i]
        assert proc is not None
        return proc

    def kill9(self, i: int) -> None:
        self.proc(i).send_signal(signal.SIGKILL)
        self.proc(i).wait(10)

    def stop(self, timeout: float = 40) -> list[int]:
        """SIGTERM every running process; their exit codes (SIGKILL after `timeout`)."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            if proc is None:
                continue
            try:
                codes.append(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait(10))
        return codes

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def assert_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None:
                raise AssertionError(
                    f"pipeline {i}/{self.processes} exited {proc.returncode}:\n"
                    + self.log(i).read_text()[-4000:]
                )

    def logs(self) -> str:
        return "\n".join(
            self.log(i).read_text() for i in range(self.processes) if self.log(i).exists()
        )


def stats_keys(messages: list[Any]) -> set[tuple[str, str, str]]:
    keys = set()
    for m in messages:
        s = json.loads(m.value())
        keys.add((s["user_id"], s["service"], s["window_start"]))
    return keys


def wait_for_outputs(
    settings: Settings, cluster: Cluster, windows: int, alerts: int, timeout: float = 120
) -> None:
    """Until every window's stats and every alert are on Kafka (stored before published)."""
    stats = TopicReader(settings, topics.USAGE_STATS)
    fired = TopicReader(settings, topics.USAGE_ALERTS)
    try:
        stats.read_until(
            lambda ms: len(stats_keys(ms)) >= windows, timeout, check=cluster.assert_alive
        )
        fired.read_until(
            lambda ms: (
                len(
                    {
                        (json.loads(m.value())["alert_id"], json.loads(m.value())["state"])
                        for m in ms
                    }
                )
                >= alerts
            ),
            timeout,
            check=cluster.assert_alive,
        )
    finally:
        stats.close()
        fired.close()


def published_windows(settings: Settings) -> int:
    """How many distinct windows' stats are on `usage.stats` now (read to its end)."""
    reader = TopicReader(settings, topics.USAGE_STATS)
    try:
        while batch := [m for m in reader.consumer.consume(1000, timeout=1) if m.error() is None]:
            reader.messages += batch
    finally:
        reader.close()
    return len(stats_keys(reader.messages))


def read_partitions(log: str, settings: Settings) -> dict[str, set[int]]:
    """The events topic's partitions a log says were read, by how: `beginning` or `offset`."""
    name = settings.topic(topics.USAGE_EVENTS)
    out: dict[str, set[int]] = {"beginning": set(), "offset": set()}
    for line in log.splitlines():
        if f"reading {name}[" in line:
            partition = int(line.split(f"{name}[")[1].split("]")[0])
            out["beginning" if "from the beginning" in line else "offset"].add(partition)
    return out


def dead_letters(settings: Settings, at_least: int) -> list[tuple[str, bytes]]:
    """What the DLQ holds, as (reason, original bytes): once `at_least` records are in, and
    whatever else arrives within a second."""
    reader = TopicReader(settings, topics.USAGE_EVENTS_DLQ)
    try:
        reader.read_until(lambda ms: len(ms) >= at_least, timeout=30)
        reader.messages += [
            m for m in reader.consumer.consume(1000, timeout=1) if m.error() is None
        ]
    finally:
        reader.close()
    return sorted(
        (dict(m.headers())["keypulse.reason"].decode().split(":")[0], m.value())
        for m in reader.messages
    )


# -- the tables -----------------------------------------------------------------------------


def dump_tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the database (but its migrations), FINAL, without the columns stamped
    at insert time, sorted: two runs that computed the same thing dump equal. Also
    `raw:<table>`, the row count without FINAL (with the twins a replay wrote, unless a
    merge replaced them), but for the rollups, which the writer recomputes at its own pace."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with embedded(path) as client:
        tables = [
            name
            for (name,) in client.query(
                "SELECT name FROM system.tables WHERE database = 'keypulse' "
                "AND engine LIKE '%MergeTree' AND name != 'schema_migrations'"
            ).result_rows
        ]
        assert "usage_stats" in tables
        for table in tables:
            columns = [
                (name, kind)
                for name, kind in client.query(
                    "SELECT name, type FROM system.columns WHERE database = 'keypulse' "
                    "AND table = {t:String} ORDER BY position",
                    parameters={"t": table},
                ).result_rows
                if name not in STAMPED
            ]
            # floats as they are (see `assert_tables_equal`), the rest (sketches, maps,
            # times) as text
            select = ", ".join(c if k.startswith("Float") else f"toString({c})" for c, k in columns)
            rows = client.query(f"SELECT {select} FROM keypulse.{table} FINAL").result_rows
            out[table] = sorted(tuple(r) for r in rows)
            if not table.startswith("usage_rollup_"):  # recomputed at the writer's pace
                out[f"raw:{table}"] = [
                    tuple(r)
                    for r in client.query(f"SELECT count() FROM keypulse.{table}").result_rows
                ]
    return out


def assert_tables_equal(
    one: dict[str, list[tuple[Any, ...]]], other: dict[str, list[tuple[Any, ...]]]
) -> None:
    """Every table row for row and column for column, exactly; but the rollups' floats,
    within a relative 1e-12: ClickHouse sums a rollup's windows in an order of its own, so
    the last bits of `latency_sum_ms` or `cost_usd` may differ between two stores."""
    assert set(one) == set(other)
    for table, rows in one.items():
        if not table.startswith("usage_rollup_"):
            assert rows == other[table], table
            continue
        assert len(rows) == len(other[table]), table
        for row, twin in zip(rows, other[table], strict=True):
            assert len(row) == len(twin)
            for a, b in zip(row, twin, strict=True):
                if isinstance(a, float):
                    assert math.isclose(a, b, rel_tol=1e-12), (table, row[:3], a, b)
                else:
                    assert a == b, (table, row[:3], a, b)


def oracle_view(path: Path) -> dict[str, Any]:
    """What the oracle (`Golden`) can say about the tables: event rows, stats, alerts,
    notifications and read states."""
    from tests.integration.truth import STATS_FIELDS

    with embedded(path) as client:
        rows = client.query(
            "SELECT event_id, user_id, toUnixTimestamp64Milli(ts), late "
            "FROM keypulse.usage_events FINAL"
        ).result_rows
        cols = ", ".join(STATS_FIELDS)
        stats = client.query(
            f"SELECT user_id, service, toUnixTimestamp64Milli(window_start), {cols} "
            "FROM keypulse.usage_stats FINAL"
        ).result_rows
        alerts = client.query(
            "SELECT rule_id, state, service, toUnixTimestamp64Milli(window_start), alert_id "
            "FROM keypulse.alerts FINAL"
        ).result_rows
        notes = client.query(
            "SELECT notification_id, user_id FROM keypulse.notifications FINAL"
        ).result_rows
        reads = client.query(
            "SELECT notification_id, user_id, read FROM keypulse.notification_reads FINAL"
        ).result_rows
    return {
        "rows": sorted(tuple(r) for r in rows),
        "stats": {(r[0], r[1], r[2]): dict(zip(STATS_FIELDS, r[3:], strict=True)) for r in stats},
        "alerts": sorted(tuple(r[:4]) for r in alerts),
        "alert_ids": {(r[4], r[1]) for r in alerts},
        "notes": sorted(tuple(r) for r in notes),
        "reads": sorted(tuple(r) for r in reads),
    }

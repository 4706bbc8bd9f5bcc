"""The 1 m / 1 h / 1 d rollups through the real pipeline: equal to the sums of their windows
and to the truth from raw events (percentiles from the merged sketch within the sketch's
bound), and identical whole tables after a kill -9 and its replay."""

from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from core import topics
from core.kafka import producer_config
from core.settings import Settings
from core.sketch import ALPHA, bin_of, merge, quantile
from infra.clickhouse.migrate import migrate
from infra.kafka import launcher
from pipeline.items import PartitionOutput
from pipeline.metrics import PipelineMetrics
from pipeline.rollups import INTERVALS_S, ROLLUP_TABLES, Pending, ranges
from pipeline.sinks import OutputSink
from pipeline.windows import WindowAcc, close_window
from schemas.events import UsageEvent
from tests.integration.harness import PipelineProcess, TopicReader, embedded, produce
from tests.integration.test_pipeline import FAST_WINDOWS, WINDOW_MS, encode, make_event, stats_keys
from tests.integration.truth import expected_windows

pytestmark = pytest.mark.integration

BUCKET_S = {"usage_rollup_1m": 60, "usage_rollup_1h": 3600, "usage_rollup_1d": 86_400}
SUMS = ("requests", "successes", "client_errors", "server_errors", "tokens_in", "tokens_out")
BOUND = ALPHA + 1e-9  # tests/unit/test_sketch.py: ±0.5 % plus float slack, inside 1 %
COLUMNS = ("windows", *SUMS, "latency_sum_ms", "latency_max_ms", "cost_usd", "latency_bins",
           "latency_bin_counts")

Rollups = dict[str, dict[tuple[str, str, int], dict[str, Any]]]


def read_rollups(path: Path) -> tuple[Rollups, list[tuple[Any, ...]]]:
    """Each rollup table FINAL by (user, service, bucket start in seconds); and the windows."""
    tables: Rollups = {}
    with embedded(path) as client:
        for table in ROLLUP_TABLES:
            rows = client.query(
                f"SELECT user_id, service, toUnixTimestamp(bucket_start), {', '.join(COLUMNS)} "
                f"FROM keypulse.{table} FINAL"
            ).result_rows
            tables[table] = {(r[0], r[1], r[2]): dict(zip(COLUMNS, r[3:], strict=True))
                             for r in rows}
        windows = client.query(
            "SELECT user_id, service, toUnixTimestamp64Milli(window_start), requests, successes, "
            "client_errors, server_errors, tokens_in, tokens_out, latency_sum_ms, "
            "latency_max_ms, cost_usd, latency_bins, latency_bin_counts "
            "FROM keypulse.usage_stats FINAL"
        ).result_rows
    return tables, [tuple(w) for w in windows]


def bucket_of(ms: int, seconds: int) -> int:
    return ms // 1000 // seconds * seconds


def assert_sums_of_windows(tables: Rollups, windows: list[tuple[Any, ...]]) -> None:
    """Every rollup row is the sum of the windows starting in its bucket, and no bucket with
    windows is missing."""
    for table, seconds in BUCKET_S.items():
        groups: dict[tuple[str, str, int], list[tuple[Any, ...]]] = defaultdict(list)
        for w in windows:
            groups[(w[0], w[1], bucket_of(w[2], seconds))].append(w)
        assert set(tables[table]) == set(groups), table
        for key, ws in groups.items():
            row = tables[table][key]
            assert row["windows"] == len(ws)
            for i, name in enumerate(SUMS):
                assert row[name] == sum(w[3 + i] for w in ws), (table, key, name)
            assert math.isclose(row["latency_sum_ms"], sum(w[9] for w in ws), rel_tol=1e-9)
            assert row["latency_max_ms"] == max(w[10] for w in ws)
            assert math.isclose(row["cost_usd"], sum(w[11] for w in ws), rel_tol=1e-9,
                                abs_tol=1e-12)
            keys, counts = merge((w[12], w[13]) for w in ws)
            assert (row["latency_bins"], row["latency_bin_counts"]) == (keys, counts)


def assert_truth(tables: Rollups, events: list[dict[str, Any]]) -> None:
    """Every rollup row against the raw events of its bucket, percentiles included."""
    for table, seconds in BUCKET_S.items():
        groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            groups[(e["user_id"], e["service"], bucket_of(e["ts"], seconds))].append(e)
        assert set(tables[table]) == set(groups), table
        for key, evs in groups.items():
            row = tables[table][key]
            latencies = sorted(float(e["latency_ms"]) for e in evs)
            assert row["windows"] == len({e["ts"] // WINDOW_MS for e in evs})
            assert row["requests"] == len(evs)
            assert row["successes"] == sum(e["status_code"] < 400 for e in evs)
            assert row["client_errors"] == sum(400 <= e["status_code"] < 500 for e in evs)
            assert row["server_errors"] == sum(e["status_code"] >= 500 for e in evs)
            assert row["tokens_in"] == sum(e.get("tokens_in", 0) for e in evs)
            assert row["tokens_out"] == sum(e.get("tokens_out", 0) for e in evs)
            assert math.isclose(row["cost_usd"], sum(e.get("cost_usd", 0) for e in evs),
                                rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(row["latency_sum_ms"], sum(latencies), rel_tol=1e-9)
            assert row["latency_max_ms"] == latencies[-1]
            sketch = Counter(bin_of(v) for v in latencies)
            assert row["latency_bins"] == sorted(sketch)
            assert row["latency_bin_counts"] == [sketch[k] for k in sorted(sketch)]
            for q in (0.5, 0.95, 0.99):
                exact = latencies[max(0, math.ceil(q * len(latencies)) - 1)]
                got = quantile(row["latency_bins"], row["latency_bin_counts"], q,
                               row["latency_max_ms"])
                assert got is not None and abs(got - exact) <= BOUND * exact, (table, key, q)


def run_until_stats(pipeline: PipelineProcess, settings: Settings, windows: int) -> int:
    """Until `windows` distinct stats rows were published (stored first), then a clean stop:
    the sink drains, so the rollups waiting are written too. How many were published."""
    reader = TopicReader(settings, topics.USAGE_STATS)
    try:
        published = reader.read_until(lambda ms: len(stats_keys(ms)) >= windows, timeout=120,
                                      check=pipeline.assert_alive)
    finally:
        assert pipeline.stop() == 0
        reader.close()
    return len(published)


def poll(reader: TopicReader) -> int:
    """What the topic holds so far, in distinct windows."""
    for message in reader.consumer.consume(1000, timeout=0.1):
        if message.error() is None:
            reader.messages.append(message)
    return len(stats_keys(reader.messages))


def test_rollups_of_a_known_stream_are_the_sums_of_its_windows_and_the_truth(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Two bursts of traffic: around a day's boundary and around an hour's, later."""
    rng = random.Random(21)
    now_ms = int(time.time() * 1000)
    day = (now_ms - 2 * 3_600_000) // 86_400_000 * 86_400_000
    hour = (now_ms - 600_000) // 3_600_000 * 3_600_000
    times = [day - 40_000 + i * 100 for i in range(800)]
    times += [hour - 90_000 + i * 150 for i in range(1200)]
    events = [make_event(rng, i, ts) for i, ts in enumerate(times)]
    events[7]["latency_ms"] = 0.0  # the zero bin
    events[9]["latency_ms"] = 3_600_000.0  # the largest latency there is
    produce(kafka_settings, topics.USAGE_EVENTS, [encode(e) for e in events])
    pipeline = PipelineProcess(kafka_settings, tmp_path, **FAST_WINDOWS)
    pipeline.start()
    run_until_stats(pipeline, kafka_settings, len(expected_windows(events, WINDOW_MS)))

    tables, windows = read_rollups(tmp_path / "clickhouse")
    assert len(windows) == len(expected_windows(events, WINDOW_MS))
    assert len({key[2] for key in tables["usage_rollup_1d"]}) >= 2  # across midnight
    assert len({key[2] for key in tables["usage_rollup_1h"]}) >= 3  # and an hour's end
    assert_sums_of_windows(tables, windows)
    assert_truth(tables, events)


def test_rollups_are_identical_after_a_kill_9_and_its_replay(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Live traffic; the pipeline is killed -9 mid-stream before any snapshot, so its restart
    replays every window written so far, which recomputes their buckets. The whole rollup
    tables then equal those of a run over the same topic that never crashed."""
    rng = random.Random(6)
    crashed = PipelineProcess(kafka_settings, tmp_path / "crashed", epoch_seconds=600,
                              **FAST_WINDOWS)
    crashed.start()
    reader = TopicReader(kafka_settings, topics.USAGE_STATS)
    events: list[dict[str, Any]] = []
    killed, stored_before_kill = False, 0
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        now_ms = int(time.time() * 1000)
        chunk = [make_event(rng, len(events) + k, now_ms, users=4) for k in range(30)]
        events.extend(chunk)
        produce(kafka_settings, topics.USAGE_EVENTS, [encode(e) for e in chunk])
        if not killed and poll(reader) >= 12:  # windows stored, no snapshot yet
            stored_before_kill = len(reader.messages)
            crashed.kill9()
            killed = True
            crashed.start()  # no snapshot yet: replays the topic from the beginning
        time.sleep(0.1)
    reader.close()
    assert killed
    expected = len(expected_windows(events, WINDOW_MS))
    published = run_until_stats(crashed, kafka_settings, expected)
    assert published >= expected + stored_before_kill  # the replay wrote those windows again

    # The same events, in the same order, on topics of its own.
    own = kafka_settings.model_copy(update={"topic_prefix": f"{kafka_settings.topic_prefix}c."})
    launcher.ensure_topics(own)
    try:
        produce(own, topics.USAGE_EVENTS, [encode(e) for e in events])
        clean = PipelineProcess(own, tmp_path / "clean", **FAST_WINDOWS)
        clean.start()
        run_until_stats(clean, own, expected)
    finally:
        launcher.delete_topics(own)

    after_replay, windows = read_rollups(tmp_path / "crashed" / "clickhouse")
    never_crashed, _ = read_rollups(tmp_path / "clean" / "clickhouse")
    assert len(windows) == expected
    assert_same_rollups(after_replay, never_crashed)
    assert_truth(after_replay, events)


def assert_same_rollups(got: Rollups, want: Rollups) -> None:
    """The same rows with the same figures: counts and bins exactly; float sums (latency,
    cost) to the last digits, since the engine adds the windows in the order their parts lie
    on disk, which differs between two runs."""
    assert {t: set(rows) for t, rows in got.items()} == {t: set(rows) for t, rows in want.items()}
    for table, rows in got.items():
        for key, row in rows.items():
            other = want[table][key]
            for column, value in row.items():
                if isinstance(value, float):
                    assert value == pytest.approx(other[column], rel=1e-12, abs=1e-12), (
                        table, key, column)
                else:
                    assert value == other[column], (table, key, column)


def test_waiting_buckets_move_up_a_level_and_survive_a_snapshot() -> None:
    pending = Pending()
    pending.mark({120, 180, 5 * 3600})
    assert ranges(pending.due(0, 1000.0, INTERVALS_S, force=False), 60) == [
        (120, 240), (18_000, 18_060)]  # consecutive minutes go in one statement
    pending.done(0, {120, 180, 5 * 3600}, 1000.0)
    pending.mark({240})
    assert pending.due(0, 1001.0, INTERVALS_S, force=False) == set()  # not its turn yet
    assert pending.due(0, 1001.0, INTERVALS_S, force=True) == {240}
    assert pending.buckets[1] == {0, 18_000}  # the hours holding the recomputed minutes
    resumed = Pending(pending.state())
    assert resumed.buckets == [{240}, {0, 18_000}, set()]
    resumed.failed(1, 1002.0)  # still waiting after a failure
    assert resumed.due(1, 1002.0 + INTERVALS_S[1], INTERVALS_S, force=False) == {0, 18_000}


def test_a_failed_recompute_keeps_the_stats_and_waits_in_the_snapshot(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """The rollup table refuses the recompute (a column dropped): the window is stored and
    published all the same, the failure counted, the minute kept in the sink's snapshot, and
    the clean stop recomputes it once the table is whole again."""
    db = kafka_settings.clickhouse_database
    start_ms = int(time.time()) // 60 * 60_000 - 3_600_000  # a minute an hour ago
    acc = WindowAcc()
    for latency in (0.0, 5.0, 12.5):
        acc.add(UsageEvent(event_id="e", ts=start_ms, user_id="u", api_key_id="k",
                           service="openai", status_code=200, latency_ms=latency))
    record = close_window("u", "openai", start_ms, 10_000, acc)
    out = PartitionOutput.empty(0)
    out.stats.append(record)
    metrics = PipelineMetrics()
    with embedded(tmp_path / "ch") as engine:
        migrate(engine, kafka_settings, progress=lambda _line: None)
        sink = OutputSink(lambda: engine, producer_config(kafka_settings), kafka_settings.topic,
                          db, max_rows=10**9, max_age_s=3600, insert_attempts=2,
                          retry_backoff_s=0, metrics=metrics)
        part = sink.build_part("output", "writer-0", None)
        try:
            engine.command(f"ALTER TABLE {db}.usage_rollup_1m DROP COLUMN cost_usd")
            part.write_batch([out])
            state = part.snapshot()
            assert metrics.rollup_failures == 1
            assert state == ([start_ms // 1000], [], [])
            engine.command(f"ALTER TABLE {db}.usage_rollup_1m ADD COLUMN cost_usd Float64")
        finally:
            part.close()
        tables, windows = read_rollups(tmp_path / "ch")
    assert len(windows) == 1 and metrics.stats_rows_written == 1
    assert metrics.rollup_failures == 1 and metrics.rollup_refreshes == 3
    for table, seconds in BUCKET_S.items():
        row = tables[table][("u", "openai", bucket_of(start_ms, seconds))]
        assert (row["windows"], row["requests"], row["latency_max_ms"]) == (1, 3, 12.5)
        assert (row["latency_bins"], row["latency_bin_counts"]) == (
            record.latency_bins, record.latency_bin_counts)
    reader = TopicReader(kafka_settings, topics.USAGE_STATS)
    try:
        assert len(reader.read_until(lambda ms: len(ms) >= 1, timeout=20)) == 1
    finally:
        reader.close()

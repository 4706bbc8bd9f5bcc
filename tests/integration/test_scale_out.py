"""Scale-out, shown exact on one machine: two `keypulse pipeline` processes as one Bytewax
cluster write the same tables as one process; a kill -9 of either of them loses nothing and
doubles nothing; a recovery store written by two processes resumes with three.

With the embedded ClickHouse only process 0 opens the store: the sink has one partition,
`writer-0`, listed by process 0 alone, and Bytewax routes every output there
(pipeline/sinks.py); the other processes read Kafka partitions and run processors. All
processes share `KEYPULSE_DATA_DIR` (the recovery store and the dedup logs), as processes of
one machine do: a process other than 0 waits for the store process 0 creates there.

The golden stream (tests/integration/cluster.py) has 3 waves of 2,304 events (4 users,
2 services, 12 windows of 2 s), redeliveries, invalid and late events, error and latency
episodes that fire and resolve the default rules, and notifications with read states.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.integration.cluster import (
    Cluster,
    Golden,
    assert_tables_equal,
    dead_letters,
    dump_tables,
    oracle_view,
    published_windows,
    read_partitions,
    second_prefix,
    wait_for_outputs,
)
from tests.integration.truth import assert_windows_equal

pytestmark = pytest.mark.integration

EVENT_PARTITIONS = {0, 1, 2}  # where the 4 users' keys land among the topic's 4 partitions


def assert_oracle(golden: Golden, view: dict[str, Any]) -> None:
    """Event rows, stats, alerts, notifications and read states as the oracle says, once."""
    assert view["rows"] == golden.event_rows()
    assert_windows_equal(view["stats"], golden.windows())
    assert view["alerts"] == golden.alerts()
    alert_notes = {f"alert:{a}:{s}" for a, s in view["alert_ids"]}
    assert len(alert_notes) == len(golden.alerts())
    want_notes = {(n.notification_id, n.user_id) for n in golden.notes}
    assert {n for n, _ in view["notes"]} == {n for n, _ in want_notes} | alert_notes
    assert len(view["notes"]) == len(want_notes) + len(alert_notes)
    assert view["reads"] == sorted((r.notification_id, r.user_id, r.read) for r in golden.reads)


def assert_dead_letters(golden: Golden, dead: list[tuple[str, bytes]], *, exact: bool) -> None:
    """Every invalid record is dead-lettered with its reason; `exact`: once (without a crash;
    a replay dead-letters its records again: the DLQ is at-least-once)."""
    reasons = {"event": "not json", "ts": "no-ts", "status_code": "bad-status"}
    want = sorted(
        (next(r for r, s in reasons.items() if s.encode() in v), v) for _, v in golden.bad
    )
    assert sorted(set(dead)) == sorted(set(want))
    if exact:
        assert dead == want


def test_two_processes_write_the_same_tables_as_one(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    golden = Golden()
    windows, alerts = len(golden.windows()), len(golden.alerts())
    assert (windows, alerts, len(golden.events)) == (288, 18, 6912)
    with second_prefix(kafka_settings, kafka_settings.topic_prefix[:-1] + "x.") as other:
        for settings in (kafka_settings, other):
            for wave in range(golden.waves):
                golden.send(settings, wave)
        one = Cluster(kafka_settings, tmp_path / "one", processes=1)
        two = Cluster(other, tmp_path / "two", processes=2)
        try:
            one.start()
            two.start()
            wait_for_outputs(kafka_settings, one, windows, alerts)
            wait_for_outputs(other, two, windows, alerts)
            assert one.stop() == [0]
            assert two.stop() == [0, 0]
        finally:
            one.kill_all()
            two.kill_all()
        dead = [dead_letters(s, len(golden.bad)) for s in (kafka_settings, other)]
    alone = dump_tables(tmp_path / "one" / "clickhouse")
    cluster = dump_tables(tmp_path / "two" / "clickhouse")
    assert len(alone["usage_events"]) == len(golden.event_rows())
    assert_tables_equal(alone, cluster)  # every column but the insert stamps
    for table in alone:
        if table.startswith("raw:"):  # without a crash nothing is written twice
            assert alone[table] == [(len(alone[table[4:]]),)], table
    assert_oracle(golden, oracle_view(tmp_path / "one" / "clickhouse"))
    assert_oracle(golden, oracle_view(tmp_path / "two" / "clickhouse"))
    for letters in dead:
        assert_dead_letters(golden, letters, exact=True)
    # One cluster: each process read its own share of the events topic.
    shares = [read_partitions(two.log(i).read_text(), other)["beginning"] for i in (0, 1)]
    assert shares[0] and shares[1]
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] >= EVENT_PARTITIONS


@pytest.mark.parametrize("victim", [0, 1], ids=["writer", "reader"])
def test_kill_9_of_one_process_of_two_loses_nothing_and_doubles_nothing(
    kafka_settings: Settings, tmp_path: Path, victim: int
) -> None:
    """Process 0 holds the writer; process 1 reads and computes. Either is killed once the
    second wave's first windows are out, after snapshots of the first wave; the third wave
    arrives while the cluster is down. The survivor cannot go on alone (a Bytewax cluster
    is all or nothing) and exits by itself; the restarted cluster resumes from the last
    snapshot and replays what came after it. Stats equal to the oracle's mean no event was
    lost or counted twice; alerts and notifications equal to it mean no episode was added."""
    golden = Golden()
    first = Golden(waves=1, t0=golden.t0)
    cluster = Cluster(kafka_settings, tmp_path, processes=2)
    try:
        golden.send(kafka_settings, 0)
        cluster.start()
        wait_for_outputs(kafka_settings, cluster, len(first.windows()), len(first.alerts()))
        time.sleep(3 * cluster.epoch_seconds)  # snapshots of the first wave
        golden.send(kafka_settings, 1)
        wait_for_outputs(kafka_settings, cluster, len(first.windows()) + 1, 0)
        cluster.kill9(victim)
        survivor = cluster.proc(1 - victim)
        try:
            code: int | None = survivor.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 1, f"the survivor went on or did not fail loudly: {code}"
        said = cluster.log(1 - victim).read_text().strip().splitlines()[-1]
        assert said.endswith(
            "pipeline: the dataflow failed: PanicException: Send thread panic: Any { .. } (exit 1)"
        ), said
        # mid-stream: after some of the second wave's windows, before the third wave
        assert len(first.windows()) < published_windows(kafka_settings) <= 2 * len(first.windows())
        golden.send(kafka_settings, 2)
        cluster.start()
        wait_for_outputs(kafka_settings, cluster, len(golden.windows()), len(golden.alerts()))
        assert cluster.stop() == [0, 0]
    finally:
        cluster.kill_all()
    assert_oracle(golden, oracle_view(tmp_path / "clickhouse"))
    assert_dead_letters(golden, dead_letters(kafka_settings, len(golden.bad)), exact=False)
    # The restart resumed from snapshots: every partition from an offset, none from scratch.
    read = read_partitions(cluster.logs(), kafka_settings)
    assert read["offset"] >= EVENT_PARTITIONS
    assert read["beginning"] >= EVENT_PARTITIONS  # the first start, before any snapshot


def test_a_store_written_by_two_processes_resumes_with_three(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Rescaling 2 → 3: Bytewax 0.21 records each execution's worker count in the recovery
    store and routes state by key, so a store of 2 partitions, written by 2 workers, resumes
    with 3. The 2-process cluster is killed (both processes, as a crash would) once the
    second wave's first windows are out, after snapshots of the first wave."""
    golden = Golden()
    first = Golden(waves=1, t0=golden.t0)
    two = Cluster(kafka_settings, tmp_path, processes=2)
    three = Cluster(kafka_settings, tmp_path, processes=3)
    try:
        golden.send(kafka_settings, 0)
        two.start()
        wait_for_outputs(kafka_settings, two, len(first.windows()), len(first.alerts()))
        time.sleep(3 * two.epoch_seconds)  # snapshots of the first wave
        golden.send(kafka_settings, 1)
        wait_for_outputs(kafka_settings, two, len(first.windows()) + 1, 0)
        two.kill9(0)
        two.kill9(1)
        golden.send(kafka_settings, 2)
        three.start()
        wait_for_outputs(kafka_settings, three, len(golden.windows()), len(golden.alerts()))
        assert three.stop() == [0, 0, 0]
    finally:
        two.kill_all()
        three.kill_all()
    assert len(list((tmp_path / "recovery").glob("part-*.sqlite3"))) == 2
    assert_oracle(golden, oracle_view(tmp_path / "clickhouse"))
    assert_dead_letters(golden, dead_letters(kafka_settings, len(golden.bad)), exact=False)
    # The three resumed from the two's snapshots, and the events topic was spread over them.
    shares = [read_partitions(three.log(i).read_text(), kafka_settings) for i in range(3)]
    assert all(not share["beginning"] for share in shares)
    assert all(share["offset"] for share in shares)
    assert set().union(*(share["offset"] for share in shares)) >= EVENT_PARTITIONS

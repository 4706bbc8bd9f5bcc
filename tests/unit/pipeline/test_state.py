"""The processor's versioned state: a snapshot of the previous release resumes to the same
outputs, every older layout is upgraded in one place, and the current one round-trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest

from pipeline.items import SourceBatch
from pipeline.metrics import PipelineMetrics
from pipeline.processor import PartitionProcessor, ProcessorConfig
from pipeline.state import STATE_VERSION, load_state, upgrade
from pipeline.windows import WindowAcc

DATA = Path(__file__).parent / "data"


def key_of(raw: str) -> bytes:
    return str(json.loads(raw)["user_id"]).encode() if raw.startswith("{") else b"u0"


@pytest.mark.parametrize("release", ["release-snapshot", "first-release-snapshot"])
def test_a_snapshot_of_an_earlier_release_resumes_to_the_same_outputs(
    release: str, tmp_path: Path
) -> None:
    """`data/<release>` holds a snapshot written by that release's own code, and what that
    code emitted after it (make_release_snapshot.py): 100bb1d, the release before state
    versions (dedup ids in a log file), and 1f8c0e9, one of the first (dedup ids pickled in
    "blobs", window accumulators with counts, no "unevaluated")."""
    data = DATA / release
    expected = json.loads((data / "expected.json").read_text())
    for ids in data.glob("*.ids"):  # a resume truncates the log to the snapshot: copy it
        shutil.copy(ids, tmp_path / ids.name)
    config = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5, dedup_dir=tmp_path)
    snapshot = (data / "snapshot.pickle").read_bytes()
    assert "version" not in load_state(snapshot)  # really an old layout
    processor = PartitionProcessor(config, snapshot, metrics=PipelineMetrics(), run_id="now")
    before = len(expected["before"])
    records: list[tuple[int, bytes | None, bytes | None]] = [
        (before + i, key_of(raw), raw.encode()) for i, raw in enumerate(expected["after"])]
    (out,), _ = processor.on_batch([SourceBatch(0, records, expected["wall_ms"], False)])
    assert len(out.stats) == 12
    # The same figures under the release's fields; fields added since (the latency sketch)
    # are the windows' own, held to the same latencies.
    got = [msgspec.to_builtins(s) for s in out.stats]
    assert [{k: g[k] for k in want} for g, want in zip(got, expected["stats"], strict=True)] == (
        expected["stats"])
    for s in out.stats:
        assert sum(s.latency_bin_counts) == s.requests
        assert s.latency_sum_ms == pytest.approx(s.latency_avg_ms * s.requests)
    assert [[d.offset, d.reason] for d in out.dead_letters] == expected["dead_letters"]
    if expected["rows"] is not None:
        rows = b"".join(chunk.data for chunk in out.event_rows).decode()
        without_ingest_time = [json.loads(line)[:-1] for line in rows.splitlines()]
        assert without_ingest_time == [json.loads(line)[:-1]
                                       for line in expected["rows"].splitlines()]
    # It snapshots in the current layout, which resumes as well.
    assert load_state(processor.snapshot())["version"] == STATE_VERSION
    resumed = PartitionProcessor(config, processor.snapshot(), metrics=PipelineMetrics())
    assert resumed.dedup.ids == processor.dedup.ids


def test_the_first_releases_layout_is_upgraded_in_one_place() -> None:
    blob = (DATA / "first-release-snapshot" / "snapshot.pickle").read_bytes()
    old = load_state(blob)
    assert "blobs" in old["dedup"] and "unevaluated" not in old
    state = upgrade(old)
    assert state["version"] == STATE_VERSION and state["unevaluated"] is None
    assert sum(len(ids) for ids in state["dedup"]["buckets"].values()) == 51
    accs = [acc for accs in state["windows"].values() for acc in accs.values()]
    assert accs and all(len(acc) == 5 for acc in accs)
    # Counts became statuses that count the same.
    acc = WindowAcc.from_state(accs[0])
    assert len(acc.statuses) == len(acc.latencies)


def test_the_current_state_round_trips() -> None:
    config = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5)
    processor = PartitionProcessor(config, None, metrics=PipelineMetrics(), run_id="a")
    raw = json.dumps({"event_id": "e", "ts": 1_700_000_001_000, "user_id": "u",
                      "api_key_id": "k", "service": "s", "status_code": 200,
                      "latency_ms": 1.0}).encode()
    processor.on_batch([SourceBatch(2, [(0, b"u", raw)], 1_700_000_002_000, True)])
    state = load_state(processor.snapshot())
    assert state["version"] == STATE_VERSION and upgrade(state) is state
    resumed = PartitionProcessor(config, processor.snapshot(), metrics=PipelineMetrics())
    assert resumed.watermark.state() == processor.watermark.state()
    assert resumed.dedup.ids == {"u\x1fe"} and resumed.open_services() == {"u": {"s"}}
    assert resumed.windows[1_700_000_000_000][("u", "s")].state() == (
        processor.windows[1_700_000_000_000][("u", "s")].state())


def test_a_snapshot_from_a_newer_release_is_refused() -> None:
    with pytest.raises(RuntimeError, match="newer than this keypulse"):
        upgrade({"version": STATE_VERSION + 1})

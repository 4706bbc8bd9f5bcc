"""Dedup horizon, expiry with event time, the memory cap, and snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.dedup import BUCKET_MS, Deduplicator, IdLog

T = 1_700_000_000_000
HOUR = 3_600_000


def test_same_id_same_user_counted_once() -> None:
    dedup = Deduplicator(HOUR, cap=1000)
    assert not dedup.seen("u1", "e1", T)
    assert dedup.seen("u1", "e1", T + 5000)
    assert not dedup.seen("u2", "e1", T)  # per user: another user's id is another event


def test_ids_expire_with_event_time_not_wall_time() -> None:
    dedup = Deduplicator(HOUR, cap=1000)
    dedup.seen("u1", "old", T)
    dedup.seen("u1", "new", T + HOUR)  # still within the horizon of "old"'s bucket
    dedup.expire()
    assert dedup.seen("u1", "old", T + HOUR)
    dedup.seen("u1", "newer", T + HOUR + 2 * BUCKET_MS)
    dedup.expire()
    assert len(dedup) == 2  # "old" left with its bucket
    assert not dedup.seen("u1", "old", T + HOUR + 2 * BUCKET_MS)


def test_memory_is_capped_oldest_first() -> None:
    dedup = Deduplicator(HOUR, cap=100)
    for minute in range(5):
        for i in range(40):
            dedup.seen("u1", f"{minute}-{i}", T + minute * BUCKET_MS)
        dedup.expire()  # once per poll batch in the processor
    assert len(dedup) <= 100
    assert dedup.evicted_early == 200 - len(dedup)
    assert dedup.seen("u1", "4-0", T + 4 * BUCKET_MS)  # the newest ids are kept


def test_snapshot_restore_round_trip() -> None:
    dedup = Deduplicator(HOUR, cap=1000)
    for i in range(10):
        dedup.seen("u1", f"e{i}", T + i * BUCKET_MS)
    state = dedup.snapshot()
    dedup.seen("u1", "after-snapshot", T)
    restored = Deduplicator.restore(state, HOUR, 1000)
    assert len(restored) == 10
    assert restored.seen("u1", "e3", T)
    assert not restored.seen("u1", "after-snapshot", T)


def test_zero_horizon_disables() -> None:
    dedup = Deduplicator(0, cap=10)
    assert not dedup.seen("u", "e", T)
    assert not dedup.seen("u", "e", T)


def restored_from_log(dedup: Deduplicator, log_dir: Path) -> Deduplicator:
    state = dedup.snapshot()
    return Deduplicator.restore(state, HOUR, dedup.cap, IdLog(log_dir, 0))


def test_log_writes_each_id_once_and_restores_them(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=10_000, log=IdLog(tmp_path, 0))
    for i in range(100):
        dedup.seen("u1", f"e{i}", T + i * 1000)
    first = dedup.snapshot()
    dedup.seen("u1", "e-late-comer", T)
    second = dedup.snapshot()
    assert first["log"][0] == second["log"][0]  # same generation, appended
    assert dedup.log is not None and dedup.log.ids == 101  # each id written once
    restored = Deduplicator.restore(second, HOUR, 10_000, IdLog(tmp_path, 0))
    assert len(restored) == 101
    assert restored.seen("u1", "e0", T) and restored.seen("u1", "e-late-comer", T)


def test_resume_cuts_off_what_a_crashed_epoch_appended(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=10_000, log=IdLog(tmp_path, 0))
    dedup.seen("u1", "before", T)
    committed = dedup.snapshot()
    dedup.seen("u1", "after", T)
    dedup.snapshot()  # written, but Bytewax never committed this epoch
    restored = Deduplicator.restore(committed, HOUR, 10_000, IdLog(tmp_path, 0))
    assert restored.seen("u1", "before", T)
    assert not restored.seen("u1", "after", T)  # replayed: counted once, now
    again = restored.snapshot()
    assert Deduplicator.restore(again, HOUR, 10_000, IdLog(tmp_path, 0)).seen("u1", "after", T)


def test_a_log_of_mostly_expired_ids_starts_a_new_generation(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=1_000_000, log=IdLog(tmp_path, 0))
    for i in range(120_000):
        dedup.seen("u1", f"old{i}", T)
    dedup.snapshot()
    dedup.seen("u1", "new", T + 2 * HOUR)
    dedup.expire()
    state = dedup.snapshot()
    assert dedup.log is not None and state["log"][0] == 2 and dedup.log.ids == 1
    dedup.seen("u1", "newer", T + 2 * HOUR)
    state = dedup.snapshot()
    assert len(list(tmp_path.glob("p0-*.ids"))) == 2  # generation 1 may still be committed
    restored = Deduplicator.restore(state, HOUR, 1_000_000, IdLog(tmp_path, 0))
    assert len(restored) == 2 and restored.seen("u1", "new", T + 2 * HOUR)
    assert [p.name for p in tmp_path.glob("p0-*.ids")] == ["p0-00000002.ids"]


def test_a_fresh_start_removes_an_earlier_runs_logs(tmp_path: Path) -> None:
    (tmp_path / "p0-00000007.ids").write_bytes(b"stale")
    dedup = Deduplicator(HOUR, cap=100, log=IdLog(tmp_path, 0))
    dedup.seen("u1", "e", T)
    state = dedup.snapshot()
    assert [p.name for p in tmp_path.glob("p0-*.ids")] == ["p0-00000008.ids"]
    assert len(Deduplicator.restore(state, HOUR, 100, IdLog(tmp_path, 0))) == 1


def test_a_log_shorter_than_its_snapshot_is_refused(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=100, log=IdLog(tmp_path, 0))
    dedup.seen("u1", "e", T)
    state = dedup.snapshot()
    (tmp_path / "p0-00000001.ids").write_bytes(b"")
    with pytest.raises(RuntimeError, match="do not match"):
        Deduplicator.restore(state, HOUR, 100, IdLog(tmp_path, 0))

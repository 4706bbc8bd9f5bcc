"""Dedup horizon, expiry with event time, the memory cap, and snapshots."""

from __future__ import annotations

from pipeline.dedup import BUCKET_MS, CHUNK, Deduplicator

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


def test_snapshot_of_a_bucket_larger_than_a_chunk() -> None:
    dedup = Deduplicator(HOUR, cap=10 * CHUNK)
    for i in range(CHUNK + 5):
        dedup.seen("u1", f"e{i}", T)
    first = dedup.snapshot()
    dedup.seen("u1", "late-comer", T)
    second = dedup.snapshot()
    bucket = T - T % BUCKET_MS
    assert first["blobs"][(bucket, 0)] is second["blobs"][(bucket, 0)]  # full: not re-pickled
    restored = Deduplicator.restore(second, HOUR, 10 * CHUNK)
    assert len(restored) == CHUNK + 6
    assert restored.seen("u1", "e0", T) and restored.seen("u1", "late-comer", T)

"""Dedup through the processor's loop (per user, horizon, expiry with event time, the cap as
a share of a total), and the Deduplicator's persistence (snapshots, id logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from pipeline.dedup import BUCKET_MS, Deduplicator, IdLog
from pipeline.processor import ProcessorConfig
from pipeline.runner import processor_config
from schemas.stats import StatsRecord
from tests.unit.pipeline.support import WALL, Driver, T, event, rows_of

HOUR = 3_600_000
CONFIG = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5)


def counted(stats: list[StatsRecord]) -> dict[str, int]:
    return {s.user_id: s.requests for s in stats}


def test_one_users_duplicate_is_counted_once() -> None:
    driver = Driver(CONFIG)
    driver.send(event("e1", T + 1000), event("e1", T + 1000), event("e2", T + 2000))
    driver.send(event("e1", T + 3000))  # a redelivery in a later batch, another ts even
    closing = driver.send(event("far", T + 30_000))
    assert counted(closing.stats) == {"u1": 2}
    assert driver.metrics.duplicates == 2


def test_two_users_with_the_same_event_id_are_both_counted() -> None:
    driver = Driver(CONFIG)
    first = driver.send(event("same", T + 1000, user="alice"), event("same", T + 1000, user="bob"),
                        event("same", T + 2000, user="carol", service="stripe"))
    closing = driver.send(event("far", T + 30_000, user="dave"))
    assert {(s.user_id, s.service, s.requests) for s in closing.stats} == {
        ("alice", "openai", 1), ("bob", "openai", 1), ("carol", "stripe", 1)}
    assert [r["user_id"] for r in rows_of(first)] == ["alice", "bob", "carol"]
    assert driver.metrics.duplicates == 0


def test_ids_expire_with_event_time_not_wall_time() -> None:
    # Wall time stands still; event time moves: ids leave with their minute's bucket.
    config = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5,
                             max_clock_skew_seconds=3 * 3600)
    driver = Driver(config)
    driver.send(event("old", T), wall=T)
    driver.send(event("new", T + HOUR), wall=T)  # still within the horizon of "old"'s bucket
    driver.send(event("old", T + HOUR), wall=T)
    assert driver.metrics.duplicates == 1
    driver.send(event("newer", T + HOUR + 2 * BUCKET_MS), wall=T)
    assert len(driver.processor.dedup) == 2  # "old" left with its bucket
    out = driver.send(event("old", T + HOUR + 2 * BUCKET_MS), wall=T)
    assert [r["event_id"] for r in rows_of(out)] == ["old"]  # counted again: beyond horizon
    assert driver.metrics.duplicates == 1


def test_zero_horizon_disables() -> None:
    driver = Driver(ProcessorConfig(dedup_horizon_seconds=0))
    out = driver.send(event("e", T), event("e", T))
    assert len(rows_of(out)) == 2 and len(driver.processor.dedup) == 0


def test_memory_is_capped_oldest_first() -> None:
    driver = Driver(ProcessorConfig(dedup_max_ids=100, max_clock_skew_seconds=600))
    for minute in range(5):  # one poll batch per minute of event time
        driver.send(*(event(f"{minute}-{i}", T + minute * BUCKET_MS) for i in range(40)))
    dedup = driver.processor.dedup
    assert len(dedup) <= 100
    assert dedup.evicted_early == 200 - len(dedup)
    driver.send(event("4-0", T + 4 * BUCKET_MS))
    assert driver.metrics.duplicates == 1  # the newest ids are kept


def test_the_bound_is_a_total_shared_by_the_partitions() -> None:
    assert ProcessorConfig(dedup_max_ids=1000, partitions=3).dedup_cap == 334  # rounded up
    driver = Driver(ProcessorConfig(dedup_max_ids=2_000_000, partitions=4))
    assert driver.processor.dedup.cap == 500_000
    settings = Settings(dev=True, topic_partitions=8, dedup_max_ids=2_000_000,
                        max_clock_skew_seconds=60, events_ttl_days=7, max_services_per_user=5)
    config = processor_config(settings)
    assert (config.dedup_cap, config.max_clock_skew_seconds, config.events_ttl_days,
            config.max_services_per_user) == (250_000, 60, 7, 5)
    assert processor_config(settings, partitions=16).dedup_cap == 125_000


def test_snapshot_restore_round_trip() -> None:
    driver = Driver(CONFIG)
    driver.send(*(event(f"e{i}", T + i * 1000) for i in range(10)))
    resumed = driver.restart()
    driver.send(event("after-snapshot", T))
    out = resumed.send(event("e3", T), event("after-snapshot", T))
    assert [r["event_id"] for r in rows_of(out)] == ["after-snapshot"]
    assert resumed.metrics.duplicates == 1


# -- persistence: the Deduplicator's own API --------------------------------------------------


def keep(dedup: Deduplicator, user: str, event_id: str, ts_ms: int) -> None:
    """Put an id in the state through the API the loop uses (state set-up, not the rule)."""
    ids = dedup.bucket(ts_ms)
    assert ids is not None
    key = f"{user}\x1f{event_id}"
    ids.append(key)
    dedup.ids.add(key)
    dedup.max_ts_ms = max(dedup.max_ts_ms, ts_ms)


def has(dedup: Deduplicator, user: str, event_id: str) -> bool:
    return f"{user}\x1f{event_id}" in dedup.ids


def test_bound_holds_expiry_to_the_newest_admitted_time() -> None:
    dedup = Deduplicator(HOUR, cap=1000)
    keep(dedup, "u", "e", T)
    dedup.max_ts_ms = 4_070_908_800_000  # restored from a snapshot a 2099 event had moved
    dedup.bound(WALL)
    dedup.expire()
    assert dedup.max_ts_ms == WALL and has(dedup, "u", "e")


def test_log_writes_each_id_once_and_restores_them(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=10_000, log=IdLog(tmp_path, 0))
    for i in range(100):
        keep(dedup, "u1", f"e{i}", T + i * 1000)
    first = dedup.snapshot()
    keep(dedup, "u1", "e-late-comer", T)
    second = dedup.snapshot()
    assert first["log"][0] == second["log"][0]  # same generation, appended
    assert dedup.log is not None and dedup.log.ids == 101  # each id written once
    restored = Deduplicator.restore(second, HOUR, 10_000, IdLog(tmp_path, 0))
    assert len(restored) == 101
    assert has(restored, "u1", "e0") and has(restored, "u1", "e-late-comer")


def test_resume_cuts_off_what_a_crashed_epoch_appended(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=10_000, log=IdLog(tmp_path, 0))
    keep(dedup, "u1", "before", T)
    committed = dedup.snapshot()
    keep(dedup, "u1", "after", T)
    dedup.snapshot()  # written, but Bytewax never committed this epoch
    restored = Deduplicator.restore(committed, HOUR, 10_000, IdLog(tmp_path, 0))
    assert has(restored, "u1", "before")
    assert not has(restored, "u1", "after")  # replayed: counted once, now
    keep(restored, "u1", "after", T)
    again = restored.snapshot()
    assert has(Deduplicator.restore(again, HOUR, 10_000, IdLog(tmp_path, 0)), "u1", "after")


def test_a_log_of_mostly_expired_ids_starts_a_new_generation(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=1_000_000, log=IdLog(tmp_path, 0))
    for i in range(120_000):
        keep(dedup, "u1", f"old{i}", T)
    dedup.snapshot()
    keep(dedup, "u1", "new", T + 2 * HOUR)
    dedup.expire()
    state = dedup.snapshot()
    assert dedup.log is not None and state["log"][0] == 2 and dedup.log.ids == 1
    keep(dedup, "u1", "newer", T + 2 * HOUR)
    state = dedup.snapshot()
    assert len(list(tmp_path.glob("p0-*.ids"))) == 2  # generation 1 may still be committed
    restored = Deduplicator.restore(state, HOUR, 1_000_000, IdLog(tmp_path, 0))
    assert len(restored) == 2 and has(restored, "u1", "new")
    assert [p.name for p in tmp_path.glob("p0-*.ids")] == ["p0-00000002.ids"]


def test_a_fresh_start_removes_an_earlier_runs_logs(tmp_path: Path) -> None:
    (tmp_path / "p0-00000007.ids").write_bytes(b"stale")
    dedup = Deduplicator(HOUR, cap=100, log=IdLog(tmp_path, 0))
    keep(dedup, "u1", "e", T)
    state = dedup.snapshot()
    assert [p.name for p in tmp_path.glob("p0-*.ids")] == ["p0-00000008.ids"]
    assert len(Deduplicator.restore(state, HOUR, 100, IdLog(tmp_path, 0))) == 1


def test_a_log_shorter_than_its_snapshot_is_refused(tmp_path: Path) -> None:
    dedup = Deduplicator(HOUR, cap=100, log=IdLog(tmp_path, 0))
    keep(dedup, "u1", "e", T)
    state = dedup.snapshot()
    (tmp_path / "p0-00000001.ids").write_bytes(b"")
    with pytest.raises(RuntimeError, match="do not match"):
        Deduplicator.restore(state, HOUR, 100, IdLog(tmp_path, 0))


def test_a_processor_with_a_log_directory_resumes_its_ids(tmp_path: Path) -> None:
    config = ProcessorConfig(dedup_dir=tmp_path)
    driver = Driver(config)
    driver.send(*(event(f"e{i}", T + i) for i in range(5)))
    resumed = driver.restart()
    assert list(tmp_path.glob("p0-*.ids"))
    resumed.send(event("e2", T), event("e9", T))
    assert resumed.metrics.duplicates == 1

"""The processor's verdicts on hostile and boundary input: admission, the bounded watermark,
the service cap, tombstones, statuses through the stats, an event exactly at the watermark,
and the limits of every numeric field."""

from __future__ import annotations

from core.clock import to_ms
from pipeline.processor import ProcessorConfig
from pipeline.windows import UINT64_MAX
from tests.unit.pipeline.support import WALL, Driver, T, event, reasons, rows_of

YEAR_2099 = 4_070_908_800_000
DAY_MS = 86_400_000
CONFIG = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5,
                         max_clock_skew_seconds=300, events_ttl_days=30)


def test_event_time_is_admitted_within_skew_ahead_and_retention_behind() -> None:
    driver = Driver(CONFIG)
    out = driver.send(
        event("at-skew", WALL + 300_000),  # exactly at the bound: admitted
        event("past-skew", WALL + 300_001),
        event("2099", YEAR_2099),
        event("at-retention", WALL - 30 * DAY_MS),  # exactly at the bound: admitted (late)
        event("past-retention", WALL - 30 * DAY_MS - 1),
        wall=WALL,
    )
    assert [r["event_id"] for r in rows_of(out)] == ["at-skew", "at-retention"]
    assert reasons(out) == ["ts_in_future", "ts_in_future", "ts_beyond_retention"]
    assert [d.offset for d in out.dead_letters] == [1, 2, 4]
    assert out.dead_letters[1].value == event("2099", YEAR_2099)  # the original bytes
    assert driver.metrics.dead_lettered == 3
    # Dead letters leave no trace: a later, admitted copy of the same id counts.
    again = driver.send(event("past-skew", WALL + 300_001), wall=WALL + 1)
    assert [r["event_id"] for r in rows_of(again)] == ["past-skew"]


def test_one_event_dated_2099_makes_nobody_late() -> None:
    driver = Driver(CONFIG)
    driver.send(event("poison", YEAR_2099, user="mallory"),
                event("a", WALL - 20_000, user="alice"))
    out = driver.send(event("b", WALL - 10_000, user="bob"))
    assert not any(r["late"] for r in rows_of(out))
    assert driver.processor.watermark.value <= WALL + 300_000 - 5000
    closing = driver.send(event("c", WALL + 20_000, user="carol"), wall=WALL + 30_000)
    assert {(s.user_id, s.requests) for s in closing.stats} == {("alice", 1), ("bob", 1)}


def test_a_future_watermark_restored_from_a_snapshot_is_brought_back() -> None:
    """A snapshot written before admission existed, after a 2099 event had moved the
    watermark and dedup's time: the next batch holds both to wall time + skew."""
    poisoned = Driver(CONFIG)
    poisoned.send(event("a", WALL - 20_000))
    watermark, dedup = poisoned.processor.watermark, poisoned.processor.dedup
    watermark.value, watermark.max_event_ms = YEAR_2099 - 5000, YEAR_2099
    dedup.max_ts_ms = YEAR_2099
    driver = poisoned.restart()
    tick = driver.send(wall=WALL)  # an idle tick is enough
    assert [s.requests for s in tick.stats] == [1]  # "a": its window ends before the bound
    watermark, dedup = driver.processor.watermark, driver.processor.dedup
    assert watermark.value == WALL + 300_000 - 5000
    assert watermark.max_event_ms == dedup.max_ts_ms == WALL + 300_000
    out = driver.send(event("b", WALL + 290_000 + 1), event("c", WALL - 1000),
                      event("c", WALL - 1000), wall=WALL)
    # Until wall time passes the bound, the last skew's worth of event time is still late;
    # dedup keeps ids of the present again.
    assert [(r["event_id"], r["late"]) for r in rows_of(out)] == [("b", False), ("c", True)]
    assert driver.metrics.duplicates == 1


def test_a_user_beyond_the_service_cap_is_dead_lettered_and_others_are_not() -> None:
    config = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5,
                             max_services_per_user=2)
    driver = Driver(config)
    out = driver.send(
        event("1", T + 1000, user="u", service="s1"),
        event("2", T + 1000, user="u", service="s2"),
        event("3", T + 1000, user="u", service="s3"),  # a third service: over the cap
        event("4", T + 2000, user="u", service="s1"),  # one it has: fine
        event("5", T + 11_000, user="u", service="s2"),  # s2 in a new window: fine
        event("6", T + 1000, user="v", service="s3"),  # another user: own cap
    )
    assert reasons(out) == ["too_many_services"]
    assert out.dead_letters[0].offset == 2
    assert driver.processor.open_services() == {"u": {"s1", "s2"}, "v": {"s3"}}
    assert driver.processor.open_pairs[("u", "s2")] == 2  # in two open windows
    # Windows close: the user's services with open windows shrink, and a new one fits.
    closing = driver.send(event("7", T + 16_000, user="w", service="s9"))
    assert len(closing.stats) == 3
    assert driver.processor.open_services() == {"u": {"s2"}, "w": {"s9"}}
    assert driver.processor.user_services == {"u": 1, "w": 1}
    assert reasons(driver.send(event("8", T + 17_000, user="u", service="s3"))) == []
    # Deterministic on replay: the cap's bookkeeping comes back with the windows.
    resumed = driver.restart()
    assert resumed.processor.open_pairs == driver.processor.open_pairs
    assert resumed.processor.user_services == driver.processor.user_services
    joiners = [event(f"x{i}", T + 18_000, user="u", service=f"n{i}") for i in range(3)]
    assert reasons(resumed.send(*joiners)) == reasons(driver.send(*joiners)) == [
        "too_many_services"] * 3


def test_a_tombstone_is_dead_lettered_as_a_tombstone() -> None:
    driver = Driver(CONFIG)
    out = driver.send(None, event("ok", T), key=b"user-7")
    (dead,) = out.dead_letters
    assert (dead.value, dead.key, dead.reason, dead.offset) == (None, b"user-7", "tombstone", 0)
    assert [r["event_id"] for r in rows_of(out)] == ["ok"]


def test_statuses_count_by_class_through_the_stats() -> None:
    driver = Driver(ProcessorConfig(window_seconds=10, allowed_lateness_seconds=0))
    statuses = [100, 200, 302, 399, 400, 499, 500, 599]
    driver.send(*(event(f"s{code}", T + i, status=code) for i, code in enumerate(statuses)))
    (stats,) = driver.send(event("far", T + 30_000, user="other")).stats
    # success = status < 400 (3xx included); client error 4xx; server error 5xx.
    assert (stats.requests, stats.successes, stats.client_errors, stats.server_errors) == (
        8, 4, 2, 2)
    assert (stats.success_rate, stats.error_rate, stats.server_error_rate) == (0.5, 0.5, 0.25)


def test_an_event_exactly_at_the_watermark_never_reopens_a_closed_window() -> None:
    driver = Driver(ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5))
    driver.send(event("a", T + 1000))
    closing = driver.send(event("b", T + 15_000))  # watermark = T + 10 s: [T, T+10 s) closes
    assert driver.processor.watermark.value == T + 10_000
    assert [to_ms(s.window_start) for s in closing.stats] == [T]
    out = driver.send(event("at-end", T + 9_999), event("at-mark", T + 10_000))
    # The closed window's last millisecond is late; the watermark's own instant opens the
    # next window, which is still open.
    assert [(r["event_id"], r["late"]) for r in rows_of(out)] == [
        ("at-end", True), ("at-mark", False)]
    later = driver.send(event("far", T + 60_000))
    assert [(to_ms(s.window_start), s.requests) for s in later.stats] == [(T + 10_000, 2)]
    assert driver.metrics.windows_closed == 2  # no second, partial row for [T, T+10 s)


def test_numeric_fields_at_their_limits() -> None:
    driver = Driver(ProcessorConfig(window_seconds=10, allowed_lateness_seconds=0))
    driver.send(
        event("l0", T, latency=0.0, tokens_in=0, tokens_out=0, cost_usd=0.0),
        event("lmax", T + 1, latency=3_600_000.0, tokens_in=2**53, tokens_out=2**53,
              cost_usd=1e12),
        event("none", T + 2, latency=1.5),
    )
    (stats,) = driver.send(event("far", T + 30_000, user="other")).stats
    assert (stats.latency_max_ms, stats.latency_p50_ms) == (3_600_000.0, 1.5)
    assert stats.latency_avg_ms == (0.0 + 3_600_000.0 + 1.5) / 3
    assert (stats.tokens_in, stats.tokens_out, stats.cost_usd) == (2**53, 2**53, 1e12)


def test_token_sums_of_one_window_saturate_instead_of_wrapping() -> None:
    driver = Driver(ProcessorConfig(window_seconds=10, allowed_lateness_seconds=0))
    driver.send(*(event(f"t{i}", T + i, tokens_in=2**53) for i in range(2049)))
    (stats,) = driver.send(event("far", T + 30_000, user="other")).stats
    assert stats.requests == 2049
    assert stats.tokens_in == UINT64_MAX  # 2,049 × 2**53 would wrap a UInt64
    assert stats.tokens_out == 0

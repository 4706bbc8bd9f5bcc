"""The whole dataflow in memory: TestingSource in, TestingSink out, time from the items."""

from __future__ import annotations

import json
from typing import Any

from bytewax.testing import TestingSink, TestingSource, run_main

from pipeline.flow import build_flow
from pipeline.items import PartitionOutput, SourceBatch
from pipeline.processor import PartitionProcessor, ProcessorConfig
from pipeline.rows import EVENT_ROW_COLUMNS, encode_rows

T = 1_700_000_000_000  # a window boundary
CONFIG = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5)


def event(
    eid: str,
    ts: int | str,
    user: str = "u1",
    service: str = "openai",
    status: int = 200,
    latency: float = 10.0,
) -> bytes:
    return json.dumps(
        {
            "event_id": eid,
            "ts": ts,
            "user_id": user,
            "api_key_id": "k1",
            "service": service,
            "status_code": status,
            "latency_ms": latency,
        }
    ).encode()


def batch(
    records: list[bytes],
    wall: int,
    caught_up: bool = False,
    first_offset: int = 0,
    partition: int = 0,
) -> SourceBatch:
    """`wall`: the source's clock, in ms after T (events up to 5 minutes after it are
    admitted)."""
    return SourceBatch(
        partition, [(first_offset + i, b"u1", r) for i, r in enumerate(records)], T + wall,
        caught_up,
    )


def tick(wall: int, partition: int = 0) -> SourceBatch:
    return SourceBatch(partition, [], T + wall, True)


def run(items: list[SourceBatch], config: ProcessorConfig = CONFIG) -> list[PartitionOutput]:
    out: list[tuple[str, PartitionOutput]] = []
    partitions = sorted({i.partition for i in items})
    run_main(build_flow(TestingSource(items), TestingSink(out), config, partitions=partitions))
    return [o for _, o in out]


def stats_of(outputs: list[PartitionOutput]) -> dict[tuple[str, str, int], Any]:
    return {
        (s.user_id, s.service, int(s.window_start.timestamp() * 1000)): s
        for o in outputs
        for s in o.stats
    }


def rows_in(out: PartitionOutput) -> list[list[Any]]:
    """The decoded usage_events_rows rows of one output."""
    return [json.loads(line) for chunk in out.event_rows for line in chunk.data.splitlines()]


def parse_row(row: list[Any]) -> tuple[str, int, bool, int, int]:
    """(event_id, ts_ms, late, partition, offset) of a usage_events_rows row."""
    named = dict(zip(EVENT_ROW_COLUMNS, row, strict=True))
    return (named["event_id"], named["ts_ms"], named["late"], named["kafka_partition"],
            named["kafka_offset"])


def rows_of(outputs: list[PartitionOutput]) -> list[tuple[str, int, bool, int, int]]:
    return [parse_row(r) for o in outputs for r in rows_in(o)]


def test_out_of_order_within_lateness_is_counted_in_its_window() -> None:
    items = [
        batch(
            [
                event("a", T + 1000),
                event("b", T + 12_000),
                event("c", T + 9_000),
                event("d", T + 16_000),
            ],
            wall=0,
        )
    ]
    stats = stats_of(run(items))
    # watermark = 16 s - 5 s = 11 s: window [0, 10) closed with a, c; [10, 20) still open
    assert stats[("u1", "openai", T)].requests == 2
    assert ("u1", "openai", T + 10_000) not in stats


def test_late_event_lands_in_rows_but_not_in_stats() -> None:
    items = [batch([event("a", T + 1000), event("b", T + 30_000), event("late", T + 2000)], wall=0)]
    outputs = run(items)
    assert stats_of(outputs)[("u1", "openai", T)].requests == 1
    late_flags = {r[0]: r[2] for r in rows_of(outputs)}
    assert late_flags == {"a": False, "b": False, "late": True}


def test_idle_stream_closes_its_last_window_as_wall_time_passes() -> None:
    items = [
        batch([event("a", T + 1000)], wall=0, caught_up=True),
        tick(1000),
        tick(10_000),
        tick(13_999),
    ]
    assert stats_of(run(items)) == {}  # watermark = 1 s - 5 s + 13.999 s of idle < 10 s
    items.append(tick(14_000))
    assert stats_of(run(items))[("u1", "openai", T)].requests == 1


def test_backlog_never_advances_with_wall_time() -> None:
    # An hour of wall time while behind (not caught up) closes nothing.
    items = [batch([event("a", T + 1000)], wall=0), batch([event("b", T + 2000)], wall=3_600_000)]
    assert stats_of(run(items)) == {}


def test_duplicates_are_counted_once() -> None:
    items = [
        batch(
            [
                event("a", T + 1000),
                event("a", T + 1000),
                event("b", T + 2000),
                event("a", T + 3000),
                event("z", T + 60_000),
            ],
            wall=0,
        )
    ]
    outputs = run(items)
    assert stats_of(outputs)[("u1", "openai", T)].requests == 2
    assert sorted(r[0] for r in rows_of(outputs)) == ["a", "b", "z"]


def test_bad_input_goes_to_the_dead_letter_stream_with_reason_and_offset() -> None:
    bad = [b"not json", b'{"event_id": "x"}', event("y", T, status=700), b"\xff\xfe"]
    outputs = run([batch([event("ok", T), *bad], wall=0, first_offset=100)])
    dead = [(d.offset, d.reason, d.value) for o in outputs for d in o.dead_letters]
    assert [d[0] for d in dead] == [101, 102, 103, 104]
    assert dead[0][1].startswith("event: not valid JSON")
    assert dead[1][1] == "ts: required field missing"
    assert dead[2][1] == "status_code: expected `int` <= 599"
    assert dead[3][1] == "event: invalid UTF-8 at byte 0"
    assert [d[2] for d in dead] == bad  # the original bytes, untouched
    assert [r[0] for r in rows_of(outputs)] == ["ok"]


def test_keys_and_services_are_separate_windows() -> None:
    items = [
        batch(
            [
                event("1", T, user="u1"),
                event("2", T, user="u2"),
                event("3", T, user="u1", service="stripe", status=503),
                event("4", T + 20_000),
            ],
            wall=0,
        )
    ]
    stats = stats_of(run(items))
    assert {k: s.requests for k, s in stats.items()} == {
        ("u1", "openai", T): 1,
        ("u2", "openai", T): 1,
        ("u1", "stripe", T): 1,
    }
    assert stats[("u1", "stripe", T)].server_error_rate == 1.0


def test_rfc3339_and_epoch_ms_timestamps_agree() -> None:
    items = [
        batch(
            [event("a", "2023-11-14T22:13:21+00:00"), event("b", T + 1000), event("c", T + 30_000)],
            wall=0,
        )
    ]
    rows = {r[0]: r[1] for r in rows_of(run(items))}
    assert rows["a"] == rows["b"] == T + 1000


def test_resume_from_snapshot_reproduces_the_same_outputs() -> None:
    """What the dataflow emits after a resume equals what it emitted the first time."""
    first = [event(f"e{i}", T + i * 700, user=f"u{i % 3}") for i in range(40)]
    second = [event(f"f{i}", T + 28_000 + i * 700, user=f"u{i % 3}") for i in range(40)]
    second += [event("e5", T + 3500, user="u2")]  # a duplicate from before the snapshot

    def process(processor: PartitionProcessor, records: list[bytes], offset: int) -> Any:
        (out,), _ = processor.on_batch([batch(records, wall=0, first_offset=offset)])
        return out

    straight = PartitionProcessor(CONFIG, None, run_id="r1")
    process(straight, first, 0)
    snapshot = straight.snapshot()
    expected = process(straight, second, 40)

    resumed = PartitionProcessor(CONFIG, snapshot, run_id="r2")
    replayed = process(resumed, second, 40)
    assert replayed.stats == expected.stats
    assert [parse_row(r) for r in rows_in(replayed)] == [
        parse_row(r) for r in rows_in(expected)]
    assert "e5" not in [parse_row(r)[0] for r in rows_in(replayed)]


def test_rows_carry_the_validated_fields_and_the_pipeline_columns() -> None:
    raw = json.loads(event("a", "2023-11-14T22:13:20.005Z"))
    raw |= {"unknown": {"deep": [1, 2]}, "ts_ms": 1, "late": True, "method": "post"}
    out = run([batch([json.dumps(raw).encode(), event("b", T + 30_000)], wall=0,
                     first_offset=7)])[0]
    assert [chunk.rows for chunk in out.event_rows] == [2]  # one chunk per poll batch
    row = rows_in(out)[0]
    named = dict(zip(EVENT_ROW_COLUMNS, row, strict=True))  # no room for unknown fields
    fields = named
    # A client's own "ts_ms" or "late" is an unknown field: the row's are the pipeline's.
    assert (named["ts_ms"], named["late"], named["kafka_partition"], named["kafka_offset"]) == (
        T + 5, False, 0, 7)
    assert fields["method"] == "post"  # upper-cased by the ingest view
    assert (fields["event_id"], fields["latency_ms"], fields["tokens_in"]) == ("a", 10.0, None)


def test_encoded_rows_are_json_compact_each_row() -> None:
    rows = [("a", 1, None, 2.5, True), ("b\n", 2, "x", 0.0, False)]
    assert [json.loads(line) for line in encode_rows(rows).splitlines()] == [list(r) for r in rows]

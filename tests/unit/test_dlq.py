"""`keypulse dlq` decisions in memory: identities, replayable reasons, the JSON lines of
`inspect --json`, the summary line (keypulse/dlq.py)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from keypulse.dlq import (
    NEVER_AS_IS,
    ON_REQUEST,
    REASON,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    TABLE,
    TRUNCATED,
    DeadLetterRecord,
    Progress,
    ReplayPolicy,
    ReplayRefused,
    Summary,
    check_replayable,
    reason_matches,
    reason_name,
    replay_headers,
)
from pipeline.dead_letters import dead_letter_headers, fit_dead_letter
from pipeline.items import DeadLetter

EVENTS = "usage.events"
NOW = 1_800_000_000_000
HOUR = 3_600_000


def value(ts: int = NOW, **extra: Any) -> bytes:
    return json.dumps(
        {
            "event_id": "e1",
            "ts": ts,
            "user_id": "u",
            "api_key_id": "k",
            "service": "openai",
            "status_code": 200,
            "latency_ms": 3.0,
            **extra,
        }
    ).encode()


def dead(
    reason: str,
    data: bytes | None = None,
    *,
    offset: int = 5,
    partition: int = 1,
    source: str = EVENTS,
    dlq_offset: int = 0,
    extra: tuple[tuple[str, bytes | None], ...] = (),
) -> DeadLetterRecord:
    """A dead letter with the headers pipeline/dead_letters.py writes."""
    data = value() if data is None else data
    headers = dead_letter_headers(DeadLetter(data, b"u", reason, partition, offset), source)
    return DeadLetterRecord(
        "usage.events.dlq",
        0,
        dlq_offset,
        b"u",
        data,
        tuple((name, v if not isinstance(v, str) else v.encode()) for name, v in headers) + extra,
    )


def policy(**overrides: Any) -> ReplayPolicy:
    return ReplayPolicy(
        **{
            "events_topic": EVENTS,
            "now_ms": NOW,
            "max_clock_skew_seconds": 300,
            "events_ttl_days": 30,
            "dedup_horizon_seconds": 3600,
            **overrides,
        }
    )


def test_the_header_names_are_the_ones_the_pipeline_writes() -> None:
    names = [name for name, _ in dead_letter_headers(DeadLetter(b"x", None, "r", 3, 9), "t")]
    assert names == [REASON, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET]
    _key, _value, fitted = fit_dead_letter(None, b"x" * 5000, [], 2000)
    assert (TRUNCATED, b"1") in fitted


def test_the_reason_names_are_the_ones_the_pipeline_gives() -> None:
    from pipeline.processor import TOMBSTONE, TOO_MANY_SERVICES

    assert TOO_MANY_SERVICES in ON_REQUEST
    assert TOMBSTONE in NEVER_AS_IS


def test_identity_is_the_source_record_else_the_dlq_position() -> None:
    assert dead("ts_in_future: 1 ms ahead").identity == "usage.events:1:5"
    bare = DeadLetterRecord("usage.events.dlq", 2, 40, None, b"x", ((REASON, b"publish_error"),))
    assert bare.origin is None
    assert bare.identity == "usage.events.dlq:2:40"


def test_reasons_are_matched_by_name_or_prefix() -> None:
    assert reason_name("ts_in_future: 1200 ms ahead") == "ts_in_future"
    assert reason_name("tombstone") == "tombstone"
    assert reason_matches("status_code: expected `int` <= 599", "status_code")
    assert reason_matches("status_code: expected `int` <= 599", "status_code: expected")
    assert not reason_matches("status_code: expected", "status")
    assert reason_matches("anything", None)


@pytest.mark.parametrize("reason", ["status_code", "event", "tombstone", "publish_error"])
def test_reasons_that_cannot_go_back_as_they_are_are_refused(reason: str) -> None:
    with pytest.raises(ReplayRefused, match="--from-file"):
        check_replayable(reason)


@pytest.mark.parametrize(
    "reason", [None, "ts_in_future", "storage_error", "too_many_services", "ts_beyond_retention"]
)
def test_replayable_reasons_pass(reason: str | None) -> None:
    check_replayable(reason)


def test_one_replay_per_identity_and_none_for_what_the_ledger_holds() -> None:
    decide = policy(done={"usage.events:1:6"}).decide
    first = dead("ts_in_future: 9 ms ahead", offset=5, dlq_offset=0)
    assert decide(first) is None
    assert decide(dead("ts_in_future: 9 ms ahead", offset=5, dlq_offset=7)) == "duplicate"
    assert decide(dead("ts_in_future: 9 ms ahead", offset=6)) == "already replayed"
    assert replay_headers(first) == [
        ("keypulse.replay.origin", b"usage.events:1:5"),
        ("keypulse.replay.reason", b"ts_in_future: 9 ms ahead"),
    ]


def test_what_would_be_refused_again_stays() -> None:
    decide = policy().decide
    assert decide(dead("ts_in_future: x", value(ts=NOW + 301_000), offset=1)) == (
        "still ts_in_future"
    )
    assert decide(dead("ts_in_future: x", value(ts=NOW + 299_000), offset=2)) is None
    assert decide(dead("status_code: bad", offset=3)) == "needs a fix (status_code)"
    assert decide(dead("tombstone", offset=4)) == "needs a fix (tombstone)"
    assert decide(dead("too_many_services: 100", offset=5)) == (
        "only with --reason (too_many_services)"
    )
    assert decide(dead("ts_in_future: x", offset=6, source="other.topic")) == ("from another topic")
    assert (
        decide(dead("ts_in_future: x", value()[:20], offset=7, extra=((TRUNCATED, b"1"),)))
        == "truncated"
    )
    assert decide(dead("ts_in_future: x", b"{", offset=8)) == "invalid (event)"
    assert decide(dead("status_code: bad", offset=9)) == "needs a fix (status_code)"
    assert policy(reason="ts_in_future").decide(dead("status_code: bad")) == "other reason"
    filtered = policy(reason="ts_in_future")
    assert filtered.decide(dead("status_code: bad", offset=1)) == "other reason"
    assert filtered.decide(dead("status_code: bad", offset=1, dlq_offset=9)) == "duplicate"
    assert policy(reason="too_many_services").decide(dead("too_many_services: 100")) is None


def test_a_storage_error_goes_back_only_past_the_dedup_horizon() -> None:
    decide = policy().decide
    table = ((TABLE, b"keypulse.usage_events_rows"),)
    recent = dead("storage_error", value(ts=NOW - HOUR + 60_000, late=False), offset=1, extra=table)
    assert decide(recent) == "within the dedup horizon"
    old = dead("storage_error", value(ts=NOW - 2 * HOUR, kafka_offset=2), offset=2, extra=table)
    assert decide(old) is None
    stats_row = DeadLetterRecord(
        "usage.events.dlq",
        0,
        3,
        b"",
        b"{}",
        ((REASON, b"storage_error"), (TABLE, b"keypulse.usage_stats")),
    )
    assert decide(stats_row) == "not a usage event (usage_stats)"
    published = DeadLetterRecord(
        "usage.events.dlq", 0, 4, b"u", b"{}", ((REASON, b"publish_error: x"),)
    )
    assert policy(from_file=True).decide(published) == "no source record"


def test_from_a_file_any_reason_goes_if_the_value_is_a_valid_event_now() -> None:
    decide = policy(from_file=True).decide
    assert decide(dead("status_code: bad", offset=1)) is None
    assert decide(dead("status_code: bad", value(status_code=999), offset=2)) == (
        "invalid (status_code)"
    )
    assert decide(dead("tombstone", b"", offset=3)) == "invalid (event)"
    nothing = DeadLetterRecord(
        "usage.events.dlq", 0, 4, b"u", None, dead("tombstone", offset=4).headers
    )
    assert decide(nothing) == "tombstone"


def test_json_lines_round_trip_text_binary_and_null() -> None:
    for data in (value(), b"\xff\x00binary", None):
        record = dead("event: invalid UTF-8", data or b"")
        record = DeadLetterRecord(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            data,
            record.headers,
            1_700_000_000_000,
        )
        line = json.loads(json.dumps(record.to_json()))
        assert DeadLetterRecord.from_json(line) == record
        assert line["identity"] == "usage.events:1:5"
    assert (
        DeadLetterRecord.from_json(dead("x", b"\xff").to_json() | {"value": "/w=="}).value
        == b"\xff"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ([], "a JSON object"),
        ({"partition": 0, "offset": 1}, "missing field 'topic'"),
        ({"topic": "t", "partition": "x", "offset": 1}, "invalid literal"),
        (
            {"topic": "t", "partition": 0, "offset": 1, "value": "%%", "value_encoding": "base64"},
            "base64|Non-base64|Invalid",
        ),
        ({"topic": "t", "partition": 0, "offset": 1, "headers": []}, "headers"),
    ],
)
def test_a_bad_line_is_a_value_error(line: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeadLetterRecord.from_json(line)


def test_the_summary_line() -> None:
    summary = Summary(read=6, replayed=3)
    summary.skipped.update({"duplicate": 1, "needs a fix (event)": 2})
    assert summary.distinct == 5
    assert summary.line(dry_run=False) == (
        "read 6, distinct 5, replayed 3, skipped 3 (duplicate: 1, needs a fix (event): 2)"
    )
    assert Summary().line(dry_run=True) == ("read 0, distinct 0, would replay 0, skipped 0")


def test_progress_speaks_only_every_few_seconds() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = Progress("reading dlq", 200, out=out, every=2.0, clock=lambda: now[0])
    progress.maybe(10)
    now[0] = 2.5
    progress.maybe(50)
    progress.maybe(60)
    assert out.getvalue() == "reading dlq: 50 of 200 records (25 %)\n"

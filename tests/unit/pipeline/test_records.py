"""Platform records read from `notifications` and `apikey.events` (pipeline/records.py):
what is stored, what is refused and why, and the records input of the in-memory dataflow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from core import topics
from pipeline.flow import build_flow
from pipeline.items import PartitionOutput, SourceBatch, TopicBatch
from pipeline.metrics import PipelineMetrics
from pipeline.processor import ProcessorConfig
from pipeline.records import legacy_event_id, records_output
from schemas.api_keys import ApiKeyAction, ApiKeyEvent, DeclaredBy
from schemas.notifications import (
    Notification,
    NotificationDelete,
    NotificationRead,
    NotificationType,
)

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WALL_MS = int(AT.timestamp() * 1000) + 60_000


def note(user: str = "alice", nid: str = "n1", at: datetime = AT) -> Notification:
    return Notification(notification_id=nid, user_id=user, type=NotificationType.INFO,
                        template="announcement", title="Hello", message="World",
                        created_at=at, data={"title": "Hello"})


def read(user: str = "alice", nid: str = "n1", flag: bool = True,
         at: datetime = AT) -> NotificationRead:
    return NotificationRead(notification_id=nid, user_id=user, read=flag, at=at)


def key_event(user: str = "alice", event_id: str = "e1") -> ApiKeyEvent:
    return ApiKeyEvent(action=ApiKeyAction.ROTATED, user_id=user, api_key_id="k1",
                       service="openai", name="prod", at=AT, event_id=event_id,
                       declared_by=DeclaredBy.SERVICE)


def batch(topic: str, records: list[tuple[bytes | None, bytes | None]]) -> TopicBatch:
    return TopicBatch(topic, SourceBatch(
        0, [(i, k, v) for i, (k, v) in enumerate(records)], WALL_MS, True))


def enc(record: msgspec.Struct) -> bytes:
    return msgspec.json.encode(record)


def test_each_kind_goes_to_its_list() -> None:
    delete = NotificationDelete(notification_id="n1", user_id="bob", at=AT)
    out = records_output(batch(topics.NOTIFICATIONS, [
        (b"alice", enc(note())), (b"*", enc(note("*", "sys"))), (b"alice", enc(read())),
        (b"bob", enc(delete)),
    ]))
    assert out is not None
    assert out.stored_notifications == [note(), note("*", "sys")]
    assert out.notification_reads == [read()]
    assert out.notification_deletes == [delete]
    assert out.notifications == []  # never published again
    keys = records_output(batch(topics.APIKEY_EVENTS, [(b"alice", enc(key_event()))]))
    assert keys is not None
    assert keys.api_key_events == [key_event()]


@pytest.mark.parametrize(("topic", "key", "value"), [
    (topics.NOTIFICATIONS, b"alice", b"not json"),
    (topics.NOTIFICATIONS, b"alice", b'{"kind": "poke", "user_id": "alice"}'),
    (topics.NOTIFICATIONS, b"alice", b'{"kind": "read", "user_id": "alice"}'),  # fields missing
    (topics.NOTIFICATIONS, b"alice", b"[" * 100_000),
    (topics.NOTIFICATIONS, b"alice", None),  # a tombstone
    (topics.NOTIFICATIONS, b"mallory", enc(note("alice"))),  # another user's history
    (topics.NOTIFICATIONS, None, enc(note("alice"))),
    (topics.NOTIFICATIONS, b"*", enc(read("*"))),  # "*" only for notifications
    (topics.NOTIFICATIONS, b"alice", enc(read(at=datetime(2099, 1, 1, tzinfo=UTC)))),
    (topics.NOTIFICATIONS, b"alice", enc(note(at=datetime(1970, 1, 1, tzinfo=UTC)))),
    (topics.APIKEY_EVENTS, b"mallory", enc(key_event("alice"))),
    (topics.APIKEY_EVENTS, b"*", enc(key_event("*"))),
    (topics.APIKEY_EVENTS, b"alice", enc(note())),
])
def test_refused_records_are_counted_and_not_stored(
    topic: str, key: bytes | None, value: bytes | None
) -> None:
    metrics = PipelineMetrics()
    assert records_output(batch(topic, [(key, value)]), metrics=metrics) is None
    assert metrics.records_refused == 1


def test_a_refused_record_leaves_the_rest_of_its_batch() -> None:
    metrics = PipelineMetrics()
    out = records_output(batch(topics.NOTIFICATIONS, [
        (b"alice", b"junk"), (b"alice", enc(read())), (b"bob", enc(read("alice"))),
    ]), metrics=metrics)
    assert out is not None
    assert out.notification_reads == [read()]
    assert metrics.records_refused == 2


def test_time_is_bounded_by_the_batch_wall_time_and_skew() -> None:
    ahead = datetime.fromtimestamp(WALL_MS / 1000, UTC) + timedelta(seconds=299)
    out = records_output(batch(topics.NOTIFICATIONS, [(b"alice", enc(read(at=ahead)))]))
    assert out is not None
    too_far = ahead + timedelta(seconds=2)
    assert records_output(batch(topics.NOTIFICATIONS, [(b"alice", enc(read(at=too_far)))]),
                          metrics=PipelineMetrics()) is None


def test_an_api_key_event_without_id_gets_one_from_its_bytes() -> None:
    value = enc(key_event(event_id=""))
    out = records_output(batch(topics.APIKEY_EVENTS, [(b"alice", value)]))
    assert out is not None
    [event] = out.api_key_events
    assert event.event_id == legacy_event_id(value)
    assert event.event_id.startswith("legacy:")
    again = records_output(batch(topics.APIKEY_EVENTS, [(b"alice", value)]))
    assert again is not None
    assert again.api_key_events == [event]  # a replay: the same identity


def test_an_idle_tick_is_nothing() -> None:
    assert records_output(batch(topics.NOTIFICATIONS, [])) is None


def test_records_input_reaches_the_sinks_first_writer() -> None:
    out: list[tuple[str, PartitionOutput]] = []
    records = TestingSource([
        batch(topics.NOTIFICATIONS, [(b"alice", enc(note())), (b"alice", b"junk")]),
        batch(topics.APIKEY_EVENTS, [(b"alice", enc(key_event()))]),
    ])
    run_main(build_flow(TestingSource([]), TestingSink(out), ProcessorConfig(),
                        partitions=[0], records=records))
    stored = [(key, o) for key, o in out if o.stored_notifications or o.api_key_events]
    assert [key for key, _ in stored] == ["0", "0"]
    assert [n for _, o in stored for n in o.stored_notifications] == [note()]
    assert [e for _, o in stored for e in o.api_key_events] == [key_event()]


def test_a_key_event_holding_a_secret_is_refused_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-live0123456789abcdefABCDEF"
    leaky = msgspec.structs.replace(key_event(), name=secret)
    bad_action = enc(key_event()).replace(b'"rotated"', f'"{secret}"'.encode())
    metrics = PipelineMetrics()
    with caplog.at_level("WARNING", logger="pipeline.records"):
        out = records_output(batch(topics.APIKEY_EVENTS, [
            (b"alice", enc(leaky)), (b"alice", bad_action)]), metrics=metrics)
    assert out is None
    assert metrics.records_refused == 2
    assert len(caplog.records) == 2
    assert "looks like a key secret" in caplog.text
    assert secret not in caplog.text

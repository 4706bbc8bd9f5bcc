"""Platform records read back from Kafka: notifications, read-state changes, deletions and
API-key events, whoever produced them (the pipeline's sink, the WebSocket bridge, the API).

    notifications  ─▶ Notification | NotificationRead | NotificationDelete (tag `kind`)
    apikey.events  ─▶ ApiKeyEvent

`records_output(item)` turns one poll batch into the lists of a `PartitionOutput` that the
sink stores (and does not publish again). A pure function of the batch and the wall time
the source read it at, so a replay after a crash decides the same way and rewrites the same
rows, which the ReplacingMergeTree tables keep once.

A record is refused (logged, counted in `records_refused`, never stored, never the end of
the dataflow) when it does not decode; when its value's `user_id` is not its key (a Kafka
writer cannot plant rows in another user's history; key "*" only for a system-wide
notification); or when its time is before 2000 or more than the clock-skew bound ahead of
the wall time it was read at (a read dated 2099 would otherwise pin the read state for
good: the tables keep the row with the latest time).

An API-key event without an `event_id` (older producers) gets one derived from its bytes,
`legacy:<hash>`: the table's identity is (user_id, event_id), and one empty id would keep
a single event per user. One holding what looks like a key secret (core/secrets.py, as the
API and the bridge check before they produce) is refused, and no value of `apikey.events`
is ever logged: a refusal names the field, not what it held.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec

from core import topics
from core.clock import from_ms
from core.secrets import looks_like_secret
from pipeline.items import PartitionOutput, TopicBatch
from pipeline.metrics import METRICS, PipelineMetrics
from schemas.api_keys import ApiKeyEvent
from schemas.notifications import (
    SYSTEM_USER,
    Notification,
    NotificationDelete,
    NotificationMessage,
    NotificationRead,
)

logger = logging.getLogger(__name__)

TOPICS = (topics.NOTIFICATIONS, topics.APIKEY_EVENTS)
"""What the records input reads (unprefixed names)."""

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
DEFAULT_MAX_SKEW_SECONDS = 300
LOGGED_BYTES = 200  # of a refused notification's value, in its log line
SECRET_CHECKED = ("api_key_id", "name", "event_id")  # the free-form strings of a key event

_notes = msgspec.json.Decoder(NotificationMessage)  # type: ignore[arg-type]
_keys = msgspec.json.Decoder(ApiKeyEvent)


class Refused(Exception):
    """Why a record is not stored (one line, logged)."""


def records_output(item: TopicBatch, *, max_skew_seconds: int = DEFAULT_MAX_SKEW_SECONDS,
                   metrics: PipelineMetrics = METRICS) -> PartitionOutput | None:
    """The records of one poll batch, sorted into the output's lists; None if none is kept
    (an idle tick, or only refused records)."""
    topic, batch = item
    if not batch.records:
        return None
    latest = from_ms(batch.wall_ms + max_skew_seconds * 1000)
    out = PartitionOutput.empty()
    refused = 0
    for offset, key, value in batch.records:
        try:
            record = decode_record(topic, key, value, latest)
        except Refused as exc:
            refused += 1
            shown = value[:LOGGED_BYTES] if value is not None and topic != topics.APIKEY_EVENTS \
                else b"..." if value is not None else None
            logger.warning("%s[%s] offset %s refused: %s (key %r, value %r)", topic,
                           batch.partition, offset, exc, None if key is None else key[:128],
                           shown)
            continue
        if isinstance(record, Notification):
            out.stored_notifications.append(record)
        elif isinstance(record, NotificationRead):
            out.notification_reads.append(record)
        elif isinstance(record, NotificationDelete):
            out.notification_deletes.append(record)
        else:
            out.api_key_events.append(record)
    if refused:
        metrics.add(records_refused=refused)
    kept = len(batch.records) - refused
    return out if kept else None


def decode_record(topic: str, key: bytes | None, value: bytes | None,
                  latest: datetime) -> NotificationMessage | ApiKeyEvent:
    """One record, decoded and checked; `Refused` says why not."""
    if value is None:
        msg = "a null value (tombstone)"
        raise Refused(msg)
    record: Any
    try:
        if topic == topics.NOTIFICATIONS:
            record = _notes.decode(value)
        elif topic == topics.APIKEY_EVENTS:
            record = _keys.decode(value)
        else:
            msg = f"not a topic of platform records: {topic}"
            raise Refused(msg)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        text = str(exc)
        if topic == topics.APIKEY_EVENTS:  # the error may quote a value: only where it is
            where = text.rpartition(" - at ")[2]
            text = f"invalid at {where}" if " - at " in text else "invalid JSON"
        msg = f"undecodable: {text}"
        raise Refused(msg) from None
    owner = key.decode(errors="replace") if key is not None else None
    if owner != record.user_id:
        msg = f"user_id {record.user_id!r} is not the key {owner!r}"
        raise Refused(msg)
    if record.user_id == SYSTEM_USER and not isinstance(record, Notification):
        msg = f"user {SYSTEM_USER!r} is for system-wide notifications only"
        raise Refused(msg)
    at = record.created_at if isinstance(record, Notification) else record.at
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # stored as UTC, as ClickHouse reads it
    if not EARLIEST <= at <= latest:
        msg = f"time {at.isoformat()} outside [{EARLIEST.date()}, read time + skew]"
        raise Refused(msg)
    if isinstance(record, ApiKeyEvent):
        for name in SECRET_CHECKED:
            if looks_like_secret(getattr(record, name)):
                msg = f"field {name!r} holds what looks like a key secret"
                raise Refused(msg)
    if isinstance(record, ApiKeyEvent) and not record.event_id:
        record = msgspec.structs.replace(record, event_id=legacy_event_id(value))
    return record  # type: ignore[no-any-return]


def legacy_event_id(value: bytes) -> str:
    """An id for an API-key event sent without one: the same bytes, the same id."""
    return "legacy:" + hashlib.blake2b(value, digest_size=16).hexdigest()

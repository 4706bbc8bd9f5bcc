"""Resume: replay a user's missed alerts and notifications from Kafka, once, in order.

A connection that authenticates with `resume_from` registers first (which fixes where its
live stream starts, the *baseline*), then a short-lived consumer reads the user's
partition of `usage.alerts` and `notifications` from the cursor up to the baseline,
keeping only the user's key. Those frames go ahead of anything queued live, so nothing is
missed and nothing comes twice. A cursor older than the log start (retention), newer than
the log end, from another partition layout, or too far behind to scan gets an explicit
`resync_required` instead.
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition

from core.kafka import consumer_config
from core.settings import Settings
from ws_bridge import cursor as cursors
from ws_bridge.connection import CURSOR_ALERTS
from ws_bridge.router import Kind, Routed, Router, origin_of

logger = logging.getLogger(__name__)

MAX_SCAN = 200_000  # messages of the partition (all users) one resume may read
TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Span:
    """[start, end) of one partition to replay."""

    topic: str
    partition: int
    start: int
    end: int
    kind: Kind


@dataclass(slots=True)
class Replay:
    frames: list[str] = field(default_factory=list)
    resync: str | None = None  # the reason, when the cursor cannot be honoured


def replay(settings: Settings, router: Router, key: bytes, start: cursors.Cursor,
           spans: tuple[Span, Span], *, max_scan: int = MAX_SCAN,
           timeout: float = TIMEOUT_S) -> Replay:
    """Blocking (run it in an executor): the frames, with cursors, of the missed messages."""
    group = f"keypulse-ws-resume-{uuid.uuid4().hex}"
    consumer = Consumer(consumer_config(settings, group_id=group))
    try:
        todo: list[Span] = []
        for span in spans:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(span.topic, span.partition), timeout=timeout)
            if span.start < low:
                return Replay(resync="beyond_retention")
            if span.start > high:
                return Replay(resync="cursor_ahead_of_log")
            if span.end - span.start > max_scan:
                return Replay(resync="too_far_behind")
            if span.start < span.end:
                todo.append(span)
        found = _read(consumer, router, key, todo, timeout)
    finally:
        consumer.close()
    if found is None:
        return Replay(resync="replay_timeout")
    pos_a, pos_n = start.alerts_offset, start.notifications_offset
    frames: list[str] = []
    for routed in heapq.merge(*found, key=lambda r: r.timestamp):
        if routed.cursor_topic == CURSOR_ALERTS:
            pos_a = routed.offset + 1
        else:
            pos_n = routed.offset + 1
        text = cursors.encode(start.alerts_partition, pos_a, start.notifications_partition, pos_n)
        frames.append(f'{routed.prefix}"cursor":"{text}",')
    router.stats.replayed += len(frames)
    return Replay(frames=frames)


def _read(consumer: Consumer, router: Router, key: bytes, spans: list[Span],
          timeout: float) -> list[list[Routed]] | None:
    """Per span, the user's messages in offset order; None on timeout."""
    found: dict[tuple[str, int], list[Routed]] = {(s.topic, s.partition): [] for s in spans}
    if not spans:
        return []
    ends = {(s.topic, s.partition): s for s in spans}
    consumer.assign([TopicPartition(s.topic, s.partition, s.start) for s in spans])
    open_spans = set(ends)
    deadline = time.monotonic() + timeout
    while open_spans:
        if time.monotonic() > deadline:
            return None
        for msg in consumer.consume(1000, 0.2):
            if msg.error() is not None:
                continue
            where = (msg.topic() or "", msg.partition() or 0)
            span = ends.get(where)
            if span is None or where not in open_spans:
                continue
            offset = msg.offset() or 0
            if offset >= span.end:
                open_spans.discard(where)
                continue
            if msg.key() == key:
                routed = router.prepare(span.kind, key, msg.value() or b"", offset,
                                        origin=origin_of(msg), timestamp=msg.timestamp()[1])
                if routed is not None and routed.cursor_topic:
                    found[where].append(routed)
            if offset >= span.end - 1:
                open_spans.discard(where)
    return [found[(s.topic, s.partition)] for s in spans]

"""Resume: replay a user's missed alerts, notifications and API-key updates from Kafka, once,
in order, bounded.

A connection that authenticates with `resume_from` registers first (which fixes where its
live stream starts, the *baseline*); then a `Replay` reads the user's partition of
`usage.alerts`, `notifications` and `apikey.events` (`replay_spans`) from the cursor up to
the baseline, keeping only the user's key, in two passes (blocking calls: run them in an
executor):

1. `plan()` scans both spans and keeps, per message of the user, only its offset, timestamp
   and size (not decoded: an undeliverable one counts too, which only errs on the safe
   side). More than `max_frames` frames or `max_bytes` bytes to replay, or a span of more
   than `max_scan` messages (all users) to read, is `too_far_behind`: the client refetches
   its state over HTTP instead. A cursor older than the log start (retention) or newer than
   the log end also gets its reason.
2. `next_chunk(frames, size)` re-reads only the ranges that hold the next planned messages
   and returns their frames, with cursors, in delivery order (the topics merged by
   timestamp, each in log order). The session writes a chunk before it asks for the next,
   so a resume holds one chunk in memory however large the backlog and however slowly the
   client reads. The consumer prefetches at most `PREFETCH_KB` and is closed (threads and
   buffers freed) while a chunk is being written: a stalled client holds no consumer.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from core.kafka import consumer_config
from core.settings import Settings
from schemas.ws import ResyncReason
from ws_bridge import cursor as cursors
from ws_bridge.registry import Registry
from ws_bridge.router import Kind, Routed, Router, origin_of

logger = logging.getLogger(__name__)

MAX_SCAN = 200_000  # messages of the partition (all users) one resume may read
TIMEOUT_S = 10.0  # per pass over Kafka: the plan, then each chunk
PREFETCH_KB = 1024  # librdkafka's fetch queue per replay (its default is 64 MB)
FRAME_OVERHEAD = 160  # bytes a frame adds to its Kafka value: envelope, ts, cursor, seq


class ReplayTimeout(Exception):
    """Kafka did not deliver a span within the timeout."""


@dataclass(frozen=True, slots=True)
class Span:
    """[start, end) of one partition to replay."""

    topic: str
    partition: int
    start: int
    end: int
    kind: Kind


@dataclass(frozen=True, slots=True)
class Bounds:
    """How much one resume may replay (frames, bytes) and scan (messages of a partition)."""

    max_frames: int
    max_bytes: int
    max_scan: int = MAX_SCAN
    timeout: float = TIMEOUT_S

    @classmethod
    def of(cls, settings: Settings) -> Bounds:
        return cls(settings.ws_resume_max_frames, settings.ws_resume_max_bytes)


def replay_spans(registry: Registry, start: cursors.Cursor,
                 baseline: cursors.Cursor) -> tuple[Span, ...]:
    """What a resume from `start` (complete: `Connection.resume_from`) reads: each cursor
    topic's partition of the user, from the cursor up to the live stream's `baseline`."""
    return (
        Span(registry.alerts_topic, baseline.alerts_partition, start.alerts_offset,
             baseline.alerts_offset, Kind.ALERTS),
        Span(registry.notifications_topic, baseline.notifications_partition,
             start.notifications_offset, baseline.notifications_offset, Kind.NOTIFICATIONS),
        Span(registry.apikeys_topic, baseline.api_keys_partition, start.api_keys_offset,
             baseline.api_keys_offset, Kind.API_KEYS),
    )


class Replay:
    """The missed frames of one resume, planned once and then read chunk by chunk."""

    def __init__(self, settings: Settings, router: Router, key: bytes, start: cursors.Cursor,
                 spans: tuple[Span, ...], bounds: Bounds) -> None:
        self.settings = settings
        self.router = router
        self.key = key
        self.start = start
        self.spans = spans
        self.bounds = bounds
        self.order: list[tuple[int, int, int]] = []  # (span index, offset, frame bytes)
        self.done = 0  # entries of `order` already returned
        self.frames = 0  # planned frames and their bytes
        self.bytes = 0
        # the next offset per cursor topic (CURSOR_ALERTS, _NOTIFICATIONS, _API_KEYS - 1)
        self._pos = [start.alerts_offset, start.notifications_offset, start.api_keys_offset]
        self._lock = threading.Lock()  # close() waits for a chunk being read
        self._consumer: Consumer | None = None
        self._closed = False

    # -- pass 1 -------------------------------------------------------------------------

    def plan(self) -> ResyncReason | None:
        """Scan the spans; None when the replay fits the bounds, else why it cannot be done."""
        with self._lock:
            consumer = self._open()
            bounds = self.bounds
            todo: list[int] = []
            for i, span in enumerate(self.spans):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(span.topic, span.partition), timeout=bounds.timeout)
                if span.start < low:
                    return ResyncReason.BEYOND_RETENTION
                if span.start > high:
                    return ResyncReason.CURSOR_AHEAD_OF_LOG
                if span.end - span.start > bounds.max_scan:
                    return ResyncReason.TOO_FAR_BEHIND
                if span.start < span.end:
                    todo.append(i)
            found: list[list[tuple[int, int, int, int]]] = [[] for _ in self.spans]
            for i in todo:
                span = self.spans[i]

                def note(msg: Any, i: int = i) -> bool:
                    size = len(msg.value() or b"") + FRAME_OVERHEAD
                    self.frames += 1
                    self.bytes += size
                    found[i].append((i, msg.offset() or 0, size, msg.timestamp()[1]))
                    return self.frames <= bounds.max_frames and self.bytes <= bounds.max_bytes

                try:
                    complete = self._scan(consumer, span, span.start, span.end, note)
                except ReplayTimeout:
                    return ResyncReason.REPLAY_TIMEOUT
                if not complete:
                    return ResyncReason.TOO_FAR_BEHIND
            self._release()
        # the delivery order: per span the log's, across spans by timestamp (ties: span order)
        self.order = [entry[:3] for entry in heapq.merge(*found, key=lambda e: e[3])]
        return None

    # -- pass 2 -------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Every planned frame was returned by `next_chunk`."""
        return self.done >= len(self.order)

    def next_chunk(self, max_frames: int, max_bytes: int) -> list[str]:
        """The next planned frames (at most `max_frames`, and past the first `max_bytes`),
        each with its cursor, until `finished`; a message that has vanished since the plan
        (retention) or cannot be decoded is skipped. ReplayTimeout if Kafka is too slow."""
        with self._lock:
            batch: list[tuple[int, int, int]] = []
            size = 0
            for entry in self.order[self.done:self.done + max_frames]:
                if batch and size + entry[2] > max_bytes:
                    break
                batch.append(entry)
                size += entry[2]
            if not batch:
                return []
            consumer = self._open()
            wanted: dict[int, set[int]] = {}
            for i, offset, _ in batch:
                wanted.setdefault(i, set()).add(offset)
            prefixes: dict[tuple[int, int], tuple[int, str]] = {}
            for i, offsets in wanted.items():
                span = self.spans[i]

                def keep(msg: Any, i: int = i, span: Span = span,
                         offsets: set[int] = offsets) -> bool:
                    offset = msg.offset() or 0
                    if offset in offsets:
                        routed = self._prepare(span, msg)
                        if routed is not None:
                            prefixes[(i, offset)] = (routed.cursor_topic, routed.prefix)
                    return True

                self._scan(consumer, span, min(offsets), max(offsets) + 1, keep)
            self.done += len(batch)
            frames: list[str] = []
            part_a, part_n, part_k = self.start.partitions()
            pos = self._pos
            for i, offset, _ in batch:
                found = prefixes.get((i, offset))
                if found is None:  # gone since the plan (retention): nothing to send
                    continue
                topic, prefix = found
                pos[topic - 1] = offset + 1
                text = cursors.encode(part_a, pos[0], part_n, pos[1], part_k, pos[2])
                frames.append(f'{prefix}"cursor":"{text}",')
            self.router.stats.replayed += len(frames)
            self._release()
            return frames

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Close the consumer (its threads and buffers) while the session writes a chunk."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    # -- reading --------------------------------------------------------------------------

    def _open(self) -> Consumer:
        if self._closed:
            msg = "replay closed"
            raise RuntimeError(msg)
        if self._consumer is None:
            group = f"keypulse-ws-resume-{uuid.uuid4().hex}"
            self._consumer = Consumer(consumer_config(
                self.settings, group_id=group,
                **{"queued.max.messages.kbytes": PREFETCH_KB, "fetch.queue.backoff.ms": 5,
                   "fetch.max.bytes": 1_048_576, "max.partition.fetch.bytes": 1_048_576,
                   # a fetch parked at the log end delays the next chunk's assign this long
                   "fetch.wait.max.ms": 10}))
        return self._consumer

    def _scan(self, consumer: Consumer, span: Span, start: int, end: int,
              visit: Callable[[Any], bool]) -> bool:
        """`visit` each of the user's messages of `span` at offsets [start, end), in order,
        until it returns False (then False); ReplayTimeout if Kafka is too slow."""
        consumer.assign([TopicPartition(span.topic, span.partition, start)])
        try:
            deadline = time.monotonic() + self.bounds.timeout
            position = start
            while position < end:
                if time.monotonic() > deadline:
                    why = f"{span.topic}[{span.partition}] not read up to {end} in time"
                    raise ReplayTimeout(why)
                # consume(n, t) waits all of t unless n arrive: wait for one, take the rest
                batch = consumer.consume(1, 0.2)
                if batch:
                    batch.extend(consumer.consume(499, 0))
                for msg in batch:
                    if (msg.error() is not None or msg.topic() != span.topic
                            or msg.partition() != span.partition):
                        continue
                    offset = msg.offset() or 0
                    if offset < position:  # left from an earlier assignment
                        continue
                    if offset >= end:
                        position = end
                        break
                    position = offset + 1
                    if msg.key() == self.key and not visit(msg):
                        return False
            return True
        finally:
            consumer.unassign()  # drops what was prefetched past `end`

    def _prepare(self, span: Span, msg: Any) -> Routed | None:
        routed = self.router.prepare(span.kind, self.key, msg.value() or b"", msg.offset() or 0,
                                     origin=origin_of(msg), timestamp=msg.timestamp()[1])
        return routed if routed is not None and routed.cursor_topic else None

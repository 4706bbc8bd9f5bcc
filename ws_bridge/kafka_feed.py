"""The Kafka side of the bridge: one consumer thread feeding the event loop in batches.

Every bridge process reads every partition of its topics (manual assignment, no consumer
group: each process serves different users, so each needs all messages), starting at the
log end. Per batch, under the registry lock, the thread advances its positions and keeps
only messages whose key (the user_id) has an open connection here; `activity` messages
only for users who subscribed to it. Kept messages are decoded and encoded off the loop
(`Router.prepare`) and handed over with one `call_soon_threadsafe` per batch.

The live tier (ws_bridge/live.py) is fed from here, on the loop and in Kafka's order:
`usage.events` messages of users with a `stats` subscriber are folded into its windows as
each batch arrives; final stats records wait in a queue of their own and are decoded, closed
in the tier (before their frames are offered) and offered a slice at a time, yielding to the
tier's provisional frames while it has some to send (`_finish`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition

from core.kafka import consumer_config
from core.settings import Settings
from ws_bridge.live import LiveTier
from ws_bridge.registry import Registry
from ws_bridge.router import BROADCAST_KEY, Kind, Routed, Router, origin_of
from ws_bridge.stats import BridgeStats

logger = logging.getLogger(__name__)

ROUTE_SLICE = 256  # prepared messages offered per turn of the event loop
# A window's close brings a final stats record for every watched (user, service) at once
# (30,000 at 10,000 users): they are decoded and handed to the live tier on the loop a slice
# at a time: a slice of FINALS_SLICE_S, then FINALS_GAP_S for the rest while the tier has
# provisional frames to send (so those do not wait behind a close: with 2 ms slices the
# close still showed in their p99, docs/benchmarks.md), back to back when it has none or
# when more than FINALS_BACKLOG records wait (so they cannot pile up without end). A final
# frame waits for its user's next update anyway (live.py).
FINALS_SLICE_S = 0.001
FINALS_GAP_S = 0.01
FINALS_BACKLOG = 60_000

METADATA_TIMEOUT_S = 10.0
REFRESH_S = 5.0


class KafkaFeed:
    """Consumes the bridge's topics in a daemon thread; `start(loop)` / `stop()`."""

    def __init__(self, settings: Settings, registry: Registry, router: Router,
                 stats: BridgeStats, *, batch_size: int = 2000, poll_timeout: float = 0.1,
                 live: LiveTier | None = None) -> None:
        self.settings = settings
        self.live = live
        self.registry = registry
        self.router = router
        self.stats = stats
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._assigned: set[str] = set()
        self.ready = threading.Event()
        # prepared messages not offered yet, in Kafka's order: offered a slice at a time
        self._routed: deque[Routed] = deque()
        self._routing = False
        # final stats records (key, value, offset, timestamp) not handled yet, in Kafka's order
        self._finals: deque[tuple[bytes, bytes, int, int]] = deque()
        self._finishing = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        config = consumer_config(
            self.settings,
            group_id=f"keypulse-ws-{uuid.uuid4().hex[:12]}",
            **{"statistics.interval.ms": 5000, "stats_cb": self._on_stats,
               "fetch.wait.max.ms": 5, "client.id": "keypulse-ws"},
        )
        self._consumer = Consumer(config)
        self._assign_missing(at_end=True)
        self.ready.set()
        self._thread = threading.Thread(target=self._run, name="ws-kafka-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    # -- assignment -------------------------------------------------------------------

    def _assign_missing(self, *, at_end: bool = False) -> None:
        """Assign every partition of topics not assigned yet: at the log end when the bridge
        starts; from the log start for a topic that appeared later (all of it is new)."""
        consumer = self._consumer
        assert consumer is not None
        wanted = [t for t in self.router.kinds if t not in self._assigned]
        if not wanted:
            return
        try:
            metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        except Exception as exc:
            logger.warning("kafka metadata unavailable: %s", exc)
            return
        add: list[TopicPartition] = []
        for topic in wanted:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                logger.warning("topic %s does not exist yet; retrying every %ss", topic, REFRESH_S)
                continue
            for partition in sorted(info.partitions):
                tp = TopicPartition(topic, partition)
                low, high = self._watermarks(tp)
                start = high if at_end else low
                with self.registry.lock:
                    if start >= 0:
                        self.registry.positions[(topic, partition)] = start
                add.append(TopicPartition(topic, partition, start))
            with self.registry.lock:
                self.registry.partitions[topic] = len(info.partitions)
            self._assigned.add(topic)
        if add:
            consumer.incremental_assign(add)
            logger.info("bridge consuming %d partitions of %s", len(add),
                        ", ".join(sorted({tp.topic for tp in add})))

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """(low, high) of a partition, retried while its leader is unknown (a new topic):
        assigning at a symbolic OFFSET_END would resolve late and skip messages."""
        consumer = self._consumer
        assert consumer is not None
        deadline = time.monotonic() + METADATA_TIMEOUT_S
        error: Exception | None = None
        while True:
            try:
                low, high = consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
            except Exception as exc:  # KafkaException
                low, high, error = -1, -1, exc
            if low >= 0 and high >= 0:
                return low, high
            if time.monotonic() > deadline:
                logger.warning("no offsets for %s[%d] (%s); reading from its log end",
                               tp.topic, tp.partition, error)
                return OFFSET_END, OFFSET_END
            time.sleep(0.1)

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        loop = self._loop
        assert consumer is not None and loop is not None
        kinds = self.router.kinds
        registry = self.registry
        positions = registry.positions
        live = self.live
        next_refresh = 0.0
        while not self._stop.is_set():
            if len(self._assigned) < len(kinds):
                now = loop.time()
                if now >= next_refresh:
                    self._assign_missing()
                    next_refresh = now + REFRESH_S
            try:
                # consume(n, timeout) waits the whole timeout unless n messages arrive:
                # wait for the first, then take whatever else is already fetched
                messages = consumer.consume(1, self.poll_timeout)
                if messages:
                    messages.extend(consumer.consume(self.batch_size - 1, 0))
            except Exception:
                logger.exception("kafka consume failed")
                self._stop.wait(1.0)
                continue
            if not messages:
                continue
            kept: list[tuple[Kind, Any]] = []
            watched: list[tuple[bytes, bytes]] = []  # usage events for the live tier
            skipped = 0
            with registry.lock:
                user_keys = registry.user_keys
                activity_keys = registry.activity_keys
                stats_keys = registry.stats_keys if live is not None else ()
                for msg in messages:
                    error = msg.error()
                    if error is not None:
                        self._on_error(error)
                        continue
                    topic: str = msg.topic()  # type: ignore[assignment]
                    offset: int = msg.offset()  # type: ignore[assignment]
                    positions[(topic, msg.partition())] = offset + 1  # type: ignore[index]
                    key = msg.key()
                    kind = kinds[topic]
                    if kind is Kind.ACTIVITY:
                        if key in stats_keys:
                            watched.append((key, msg.value() or b""))  # type: ignore[arg-type]
                            if key in activity_keys:
                                kept.append((kind, msg))
                        elif key in activity_keys:
                            kept.append((kind, msg))
                        else:
                            skipped += 1
                    elif key in user_keys or (kind is Kind.NOTIFICATIONS and key == BROADCAST_KEY):
                        kept.append((kind, msg))
                    else:
                        skipped += 1
            self.stats.messages_in += len(messages)
            self.stats.messages_skipped += skipped
            if not kept and not watched:
                continue
            batch: list[Routed] = []
            finals: list[tuple[bytes, bytes, int, int]] = []
            for kind, msg in kept:
                if kind is Kind.STATS:  # decoded on the loop, a slice at a time
                    finals.append((msg.key() or b"", msg.value() or b"", msg.offset() or 0,
                                   msg.timestamp()[1]))
                    continue
                origin = origin_of(msg) if kind is Kind.NOTIFICATIONS else None
                routed = self.router.prepare(kind, msg.key() or b"", msg.value() or b"",
                                             msg.offset() or 0, origin=origin,
                                             timestamp=msg.timestamp()[1])
                if routed is not None:
                    batch.append(routed)
            try:
                loop.call_soon_threadsafe(self._on_loop, watched, finals, batch)
            except RuntimeError:  # loop closed during shutdown
                return

    def _on_loop(self, watched: list[tuple[bytes, bytes]],
                 finals: list[tuple[bytes, bytes, int, int]], batch: list[Routed]) -> None:
        """On the event loop, in Kafka's order: a batch's watched events are folded into the
        live tier, its frames go out, and its final stats records join those waiting
        (`_finish`). The live tier works on the loop, as the frames it builds do: on a
        thread of its own it fought the loop for the GIL and fell seconds behind at 20,000
        events/s (docs/benchmarks.md)."""
        live = self.live
        if live is not None and watched:
            live.fold(watched)
        if finals:
            self._finals.extend(finals)
            if not self._finishing:
                self._finishing = True
                self._finish()
        if batch:
            self._routed.extend(batch)
            if not self._routing:
                self._routing = True
                self._route_slice()

    def _route_slice(self) -> None:
        """Offer up to ROUTE_SLICE prepared messages, then let the loop run: a window's
        close brings a final record for every watched (user, service) at once, and offering
        them in one go held the loop (and the provisional frames behind it) for a second."""
        routed = self._routed
        live = self.live
        count = min(len(routed), ROUTE_SLICE)
        self.router.dispatch([routed.popleft() for _ in range(count)],
                             hold=live.hold if live is not None else None)
        if routed and self._loop is not None:
            self._loop.call_soon(self._route_slice)
        else:
            self._routing = False

    def _finish(self) -> None:
        """Handle waiting final stats records for FINALS_SLICE_S: decode and check them and
        hand them to the live tier, which closes their windows (so no provisional frame
        follows a final one) and sends each with its user's next update; offer those it
        does not keep (or all, without a tier). Then let the loop run, and come back after
        FINALS_GAP_S while the live tier is busy (see FINALS_BACKLOG)."""
        finals = self._finals
        live = self.live
        router = self.router
        deadline = time.perf_counter() + FINALS_SLICE_S
        try:
            while finals:
                batch: list[Routed] = []
                for _ in range(min(64, len(finals))):
                    key, value, offset, timestamp = finals.popleft()
                    routed = router.prepare(Kind.STATS, key, value, offset, timestamp=timestamp)
                    if routed is not None:
                        batch.append(routed)
                if live is not None:  # it keeps them for its users' next updates
                    left = live.close([(r.user_id, *r.coalesce, r.prefix) for r in batch])
                    kept = len(batch) - len(left)
                    if kept:  # counted as routed when handed over (written ≤ 1 s later)
                        self.stats.messages_routed += kept
                        if not left:
                            self.stats.delivered(batch)
                    batch = [batch[i] for i in left]
                if batch:
                    router.dispatch(batch, hold=live.hold if live is not None else None)
                if time.perf_counter() >= deadline:
                    break
        except Exception:  # the records taken are lost, not the path
            logger.exception("final stats records failed")
        loop = self._loop
        if finals and loop is not None:
            if live is not None and live.busy and len(finals) < FINALS_BACKLOG:
                loop.call_later(FINALS_GAP_S, self._finish)
            else:
                loop.call_soon(self._finish)
        else:
            self._finishing = False

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        logger.warning("kafka: %s", error)

    def _on_stats(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except ValueError:
            return
        lag = 0
        for topic in data.get("topics", {}).values():
            for partition in topic.get("partitions", {}).values():
                value = partition.get("consumer_lag", -1)
                if isinstance(value, int) and value > 0 and partition.get("partition", -1) >= 0:
                    lag += value
        self.stats.consumer_lag = lag


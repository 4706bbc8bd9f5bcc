"""The ingest path's parts (`POST /v1/events`, DESIGN §8): a bounded body reader, the batch
parser, a per-caller rate limiter and the Kafka producer that waits for confirmation.

    read_body(request, limit)   the body, gunzipped; 413 past `limit` bytes (raw or inflated)
    parse_batch(body)           the events' raw JSON: a JSON array or {"events": [...]}
    RateLimiter                 token bucket per caller, in events/s with a burst
    EventProducer               one long-lived Producer; `send` returns once Kafka confirmed
                                (the app's one producer, for every topic: api.deps.PublisherDep)
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections.abc import Sequence

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from fastapi import Request

from api.errors import APIError
from core.clock import Clock
from core.kafka import producer_config
from core.limits import TokenBucket
from core.settings import Settings
from core.topics import USAGE_EVENTS

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_EVENTS = 1000
# How the ingest producer sends a batch: it lingers while the batch is produced (about 1 ms
# for 500 events; splitting a batch into several requests was slower), then `send` waits in
# flush() slices, which send at once what lingers (librdkafka ignores linger.ms while a flush
# runs) and serve the delivery reports. Waiting in poll() instead added the whole linger to
# every answer (2 ms linger: 6.6 ms for 500 events to be confirmed, flush slices: 4-5 ms).
LINGER_MS = 5
FLUSH_SLICE_SECONDS = 0.001  # a slice ends early once nothing is left in flight
MAX_FLUSH_SLICE_SECONDS = 0.008
MAX_QUEUED = 1_000_000  # events queued or in flight: past this a batch is refused (503)


def _too_large(*, inflated: bool = False) -> APIError:
    what = "the decompressed body" if inflated else "the body"
    return APIError(413, "payload_too_large", f"{what} exceeds {MAX_BODY_BYTES} bytes")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, at most `limit` bytes as sent and as inflated: refused from its
    Content-Length before reading, else while streaming (never more than limit + one chunk
    held); a gzip body inflates at most limit + 1 bytes (a gzip bomb stops there)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise APIError(415, "unsupported_media_type",
                       f"Content-Encoding {encoding!r} is not supported (gzip or identity)")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "bad_request", "invalid Content-Length")
        if int(length) > limit:
            raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large()
        chunks.append(chunk)
    body = b"".join(chunks)
    if encoding == "identity":
        return body
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise APIError(400, "bad_request", f"invalid gzip body: {exc}") from None
    if len(inflated) > limit:
        raise _too_large(inflated=True)
    if not inflater.eof:
        raise APIError(400, "bad_request", "invalid gzip body: truncated")
    return inflated


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    events: list[msgspec.Raw]


_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw] | _Envelope)


def parse_batch(body: bytes) -> list[msgspec.Raw]:
    """Each event's JSON text, undecoded: 400 for text that is not JSON, 422 for JSON that is
    not an array or {"events": array}, 413 beyond MAX_EVENTS."""
    try:
        batch = _batch_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise APIError(422, "invalid_request",
                       f"the body must be a JSON array of events or {{\"events\": [...]}}: {exc}",
                       field="events") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise APIError(400, "malformed_body", f"the body is not JSON: {exc}") from None
    events = batch.events if isinstance(batch, _Envelope) else batch
    if len(events) > MAX_EVENTS:
        raise APIError(413, "payload_too_large",
                       f"{len(events)} events exceed the limit of {MAX_EVENTS} per request")
    return events


class RateLimiter:
    """A token bucket per caller (core.limits): `rate` events/s, holding at most `burst`.
    Thread-safe; full (idle) buckets are forgotten when many callers are tracked, so memory
    stays bounded."""

    MAX_CALLERS = 100_000

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, caller: str, cost: int) -> float:
        """Takes `cost` tokens and answers 0, or takes none and answers the seconds to wait."""
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is None:
                bucket = self._buckets[caller] = TokenBucket(self.rate, self.burst, self.clock)
            wait = bucket.wait(min(float(cost), self.burst))
            if wait and len(self._buckets) > self.MAX_CALLERS:
                self._buckets = {c: b for c, b in self._buckets.items() if not b.full()}
            return wait


class EventProducer:
    """One idempotent Producer for the app (created on first use, closed at shutdown);
    `send` produces a batch and waits for Kafka's delivery reports.

    `send` blocks: the route runs it on a worker thread, which produces and then serves the
    delivery reports itself. Tried and measured slower with the pipeline in the same process:
    producing on the event loop and awaiting a future resolved by a poller thread, or by
    polling from the loop. Each delivery report takes the GIL, and a second thread serving
    them contended with the thread producing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(USAGE_EVENTS)
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    def _get(self) -> Producer:
        with self._lock:
            if self._producer is None:
                timeout_ms = max(1, int(self.settings.ingest_timeout_seconds * 1000))
                self._producer = Producer(producer_config(self.settings, **{
                    "message.timeout.ms": timeout_ms, "linger.ms": LINGER_MS,
                    "queue.buffering.max.messages": MAX_QUEUED}))
            return self._producer

    def send(self, messages: Sequence[tuple[bytes, bytes | None]],
             topic: str | None = None) -> str | None:
        """Produces `(key, value)` pairs to `topic` (prefixed name; default `usage.events`;
        a None value is a tombstone); None once Kafka confirmed every one, else why not (an
        error, or no confirmation within `ingest_timeout_seconds`). Blocking. A batch the
        local queue has no room for is refused before any of it is produced."""
        if not messages:
            return None
        producer = self._get()
        if len(producer) + len(messages) > MAX_QUEUED:
            return f"the local queue holds {len(producer)} events: Kafka is not keeping up"
        pending = [len(messages)]
        errors: list[str] = []
        counting = threading.Lock()  # another request's poll may serve these callbacks

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            with counting:
                pending[0] -= 1
            if err is not None:
                errors.append(str(err))

        produce, topic = producer.produce, topic or self.topic
        try:
            for key, value in messages:
                produce(topic, value, key, on_delivery=delivered)
        except (BufferError, KafkaException) as exc:  # e.g. the queue's byte limit
            producer.poll(0)
            return f"cannot produce: {exc}"
        deadline = time.monotonic() + self.settings.ingest_timeout_seconds
        slice_seconds = FLUSH_SLICE_SECONDS
        while pending[0] > 0 and not errors:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"Kafka did not confirm {pending[0]} events in time"
            before = pending[0]
            producer.flush(min(left, slice_seconds))
            # Nothing confirmed in a slice (Kafka slow or down): longer slices, fewer wakeups.
            slice_seconds = (FLUSH_SLICE_SECONDS if pending[0] < before
                             else min(2 * slice_seconds, MAX_FLUSH_SLICE_SECONDS))
        if errors:
            return f"Kafka refused events: {errors[0]}"
        return None

    def close(self) -> None:
        """Flushes what is still queued (bounded) and drops the producer."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            left = producer.flush(self.settings.ingest_timeout_seconds)
            if left:
                logger.warning("closing the ingest producer with %s events unconfirmed", left)


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def value_of(raw: bytes) -> bytes:
    """The event's JSON with its whitespace removed: the same fields and the same number
    texts as sent (nothing is rounded through a float). Text without a whitespace byte is
    compact already and kept as it is (msgspec's format would return it unchanged, at 1.5 µs
    an event)."""
    if b" " in raw or b"\n" in raw or b"\r" in raw or b"\t" in raw:
        return msgspec.json.format(raw, indent=-1)
    return raw

"""The Python SDK for services that emit usage events (DESIGN §1 events, §8 `POST /v1/events`).

    with keypulse.sdk.Client("https://keypulse.example", token) as client:
        client.track(user_id="u1", api_key_id="k1", service="openai",
                     status_code=200, latency_ms=84.0, tokens_in=12)

`track()` is the request path's only call: it builds the event (`event_id` a uuid4, `ts` now in
epoch ms unless given), checks it with the pipeline's own decoder (schemas.events.decode_event)
and appends it to a bounded queue: O(1), no I/O, no waiting on the network. A daemon thread
sends batches (at most 500 events or 1 MiB, at least every `flush_interval`) to
`POST {url}/v1/events` over one keep-alive HTTP/1.1 connection, or straight to Kafka
(`Client(kafka=settings)`: topic `usage.events` with the settings' prefix, key `user_id`).

What can go wrong, and what the client does (it never raises into the caller for delivery):

    429, 408, 5xx, no connection   retried: exponential backoff with full jitter, never sooner
                                   than the server's Retry-After (`stats.retries`)
    202 with rejected[]            counted (`stats.rejected`) and logged, not retried
    any other 4xx (401, 403, ...)  the batch is counted (`stats.failed`) and logged, not retried
    queue full                     the oldest event is dropped (`stats.dropped`)
    exit                           an atexit hook closes the client: it sends what is queued,
                                   for at most `exit_timeout` seconds

Calling `track()` wrong (a missing or unknown field: TypeError; a value the pipeline would
refuse: schemas.events.InvalidEvent, a ValueError, with the pipeline's reason) is a bug at the
call site and raises, unless `strict=False`, which counts it (`stats.invalid`) and logs it.
Logs go to the `keypulse.sdk` logger; the token is never logged.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import http.client
import logging
import random
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import msgspec

from core import __version__
from core.topics import USAGE_EVENTS
from schemas.events import (
    InvalidEvent,
    UsageEvent,
    decode_event,
    encode_event,
    ts_bounds,
    ts_reason,
)

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer

    from core.settings import Settings

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 500  # the ingest benchmark's batch; the endpoint takes up to 1,000
MAX_BATCH_BYTES = 1024 * 1024  # the endpoint's body limit (sent and inflated)
SDK_NAME = f"keypulse-python/{__version__}"

# (seq, key, value): seq orders events for flush(); key is the user_id; value the event's JSON.
_Item = tuple[int, bytes, bytes]


@dataclass(frozen=True)
class Stats:
    """Counts since the client was made. tracked = delivered + rejected + failed + dropped +
    pending: every tracked event ends up in exactly one of the first four."""

    tracked: int  # taken by track() (not those it refused as invalid)
    delivered: int  # accepted by the endpoint, or confirmed by Kafka
    rejected: int  # refused by the endpoint's validation (202 rejected[]); not retried
    failed: int  # given up: a non-retryable answer (401, 403, ...), or unsent when close() ended
    dropped: int  # pushed out of a full queue (the oldest first), or tracked after close()
    invalid: int  # refused by track() itself (strict=False)
    retries: int  # attempts retried after a 429, 408, 5xx or connection error
    pending: int  # queued or being sent now


@dataclass
class _Outcome:
    """What one attempt at sending a batch came to."""

    delivered: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index in batch, reason)
    retry: list[_Item] = field(default_factory=list)  # to send again
    retry_after: float = 0.0  # the server's minimum wait, seconds
    failed: str | None = None  # why the whole batch was given up
    reason: str = ""  # why `retry` is not empty


class _Transport(Protocol):
    def send(self, batch: list[_Item]) -> _Outcome: ...

    def close(self) -> None: ...


class Client:
    """Queues events from any thread and sends them from one daemon thread (module docstring).

    url, token      the API's base URL and a bearer token with the `ingest` role (or `user`
                    for its own user_id); or
    kafka           settings (core.settings) to produce to their broker's `usage.events`
    max_queue       events held at most; when full the oldest is dropped
    batch_size      events per request, at most 500
    flush_interval  seconds between sends when batches do not fill up
    compress        gzip the request bodies
    timeout         seconds for one request (or Kafka's confirmation)
    backoff_base, backoff_max   retry n waits uniform(0, min(max, base * 2**n)) seconds, and at
                    least the Retry-After the server sent
    strict          an invalid event raises in track() (else it is counted and logged)
    exit_timeout    seconds the atexit hook spends sending what is left
    clock           seconds since the epoch, for the events' `ts`
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 kafka: Settings | None = None, max_queue: int = 100_000,
                 batch_size: int = MAX_BATCH_EVENTS, flush_interval: float = 1.0,
                 compress: bool = True, timeout: float = 10.0, backoff_base: float = 0.2,
                 backoff_max: float = 30.0, strict: bool = True, exit_timeout: float = 5.0,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        if (url is None) == (kafka is None):
            msg = "give either url (with a token) or kafka settings"
            raise ValueError(msg)
        if not 1 <= batch_size <= MAX_BATCH_EVENTS:
            msg = f"batch_size must be in [1, {MAX_BATCH_EVENTS}], got {batch_size}"
            raise ValueError(msg)
        if max_queue < 1 or flush_interval <= 0 or timeout <= 0:
            msg = "max_queue, flush_interval and timeout must be positive"
            raise ValueError(msg)
        self._transport: _Transport
        if url is not None:
            if not token:
                msg = "a token is needed to send to the API"
                raise ValueError(msg)
            self._transport = _HTTP(url, token, timeout=timeout, compress=compress)
        else:
            assert kafka is not None
            self._transport = _Kafka(kafka, timeout=timeout)
        self._kafka = kafka  # in Kafka mode track() applies the pipeline's event-time admission
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._interval = flush_interval
        self._backoff = (backoff_base, backoff_max)
        self._strict = strict
        self._exit_timeout = exit_timeout
        self._clock = clock
        self._rng = rng or random.Random()  # jitter, not secrets
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the sender: work to do
        self._settled = threading.Condition(self._lock)  # flush()/close(): events resolved
        self._stop = threading.Event()  # close() ran out of time: give up retrying
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._in_flight: list[_Item] = []
        self._flush_to = 0  # events with a smaller seq are sent without waiting
        self._closing = False
        self._counts = dict.fromkeys(
            ("tracked", "delivered", "rejected", "failed", "dropped", "invalid", "retries"), 0)
        self._thread = threading.Thread(target=self._run, name="keypulse-sdk", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # -- the caller's side ----------------------------------------------------------------------

    def track(self, *, user_id: str, api_key_id: str, service: str, status_code: int,
              latency_ms: float, ts: int | float | datetime | None = None,
              event_id: str | None = None, **fields: Any) -> str | None:
        """Queues one event and answers its event_id (None if it was not queued: invalid with
        strict=False, or the client is closed). The optional fields are UsageEvent's:
        endpoint, method, tokens_in, tokens_out, cost_usd, request_bytes, response_bytes,
        error_type, region, sdk (default "keypulse-python/<version>")."""
        fields.setdefault("sdk", SDK_NAME)
        event = UsageEvent(  # TypeError for a missing or unknown field: a bug at the call site
            event_id=event_id or str(uuid.uuid4()),
            ts=int(self._clock() * 1000) if ts is None else ts,
            user_id=user_id, api_key_id=api_key_id, service=service, status_code=status_code,
            latency_ms=latency_ms, **fields)
        value = encode_event(event)
        try:
            self._admit(value)
        except InvalidEvent as exc:
            if self._strict:
                raise
            with self._lock:
                self._counts["invalid"] += 1
            logger.warning("event not queued: %s", exc.reason)
            return None
        key = user_id.encode()
        dropped = 0  # the drop count after this call's drop, if it dropped one
        with self._lock:
            closing = self._closing
            if closing or len(self._queue) >= self._max_queue:
                if not closing:
                    self._queued_bytes -= len(self._queue.popleft()[2])
                dropped = self._counts["dropped"] = self._counts["dropped"] + 1
            seq = self._counts["tracked"]
            self._counts["tracked"] = seq + 1
            if not closing:
                self._queue.append((seq, key, value))
                self._queued_bytes += len(value)
                if len(self._queue) >= self._batch_size or self._queued_bytes >= MAX_BATCH_BYTES:
                    self._wake.notify()
        if dropped and dropped & (dropped - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... drop
            why = "tracked after close()" if closing else "the queue was full"
            logger.warning("%d events dropped so far (the latest: %s)", dropped, why)
        if closing:
            return None
        return event.event_id

    def _admit(self, value: bytes) -> None:
        """The pipeline's checks: the decoder, and in Kafka mode (no endpoint to ask) the
        event-time admission too."""
        event = decode_event(value)
        if self._kafka is not None:
            wall_ms = int(self._clock() * 1000)
            skew, ttl = self._kafka.max_clock_skew_seconds, self._kafka.events_ttl_days
            oldest, newest = ts_bounds(wall_ms, skew, ttl)
            if not oldest <= event.ts_ms <= newest:
                raise InvalidEvent(ts_reason(event.ts_ms, wall_ms, skew, ttl))

    @property
    def stats(self) -> Stats:
        with self._lock:
            pending = len(self._queue) + len(self._in_flight)
            return Stats(**self._counts, pending=pending)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Sends every event tracked before this call now; waits until each is resolved
        (delivered, rejected, failed or dropped) and answers True, or False after `timeout`
        seconds (None: no limit). Never raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._counts["tracked"]
            self._flush_to = max(self._flush_to, target)
            self._wake.notify()
            while not self._resolved_before(target):
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not self._thread.is_alive():
                    return False
                self._settled.wait(left)
            return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Sends what is queued and stops the thread; True if everything was resolved within
        `timeout` seconds, else what is left is counted as failed. Idempotent; never raises."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()  # the sender gives up its retries and counts the rest as failed
            self._thread.join()
        self._transport.close()
        atexit.unregister(self._at_exit)
        with self._lock:
            return not self._queue and not self._in_flight and self._counts["failed"] == 0

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _at_exit(self) -> None:
        if not self.close(self._exit_timeout):
            logger.warning("exiting with undelivered events: %s", self.stats)

    # -- the sender thread ----------------------------------------------------------------------

    def _resolved_before(self, target: int) -> bool:
        """No event with seq < target is queued or in flight (both are in seq order)."""
        return ((not self._queue or self._queue[0][0] >= target)
                and (not self._in_flight or self._in_flight[0][0] >= target))

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._deliver(batch)
            except Exception:  # a bug here must not kill the thread and strand the queue
                logger.exception("sending a batch of %d events failed", len(batch))
            with self._lock:
                stopped = self._stop.is_set()  # close() ran out of time: give the rest up
                left = len(self._in_flight) + (len(self._queue) if stopped else 0)
                self._counts["failed"] += left  # 0 unless given up (or a bug above)
                self._in_flight = []
                if stopped:
                    self._queue.clear()
                    self._queued_bytes = 0
                self._settled.notify_all()
            if stopped:
                return

    def _next_batch(self) -> list[_Item] | None:
        """Waits for a full batch, a flush, close() or the interval; None once closed and empty."""
        with self._lock:
            deadline = time.monotonic() + self._interval
            queue = self._queue
            while not queue or not (
                    self._closing or queue[0][0] < self._flush_to
                    or len(queue) >= self._batch_size or self._queued_bytes >= MAX_BATCH_BYTES
                    or time.monotonic() >= deadline):
                if self._closing:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    deadline, left = time.monotonic() + self._interval, self._interval
                self._wake.wait(left)
            batch: list[_Item] = []
            size = 2  # the array's brackets; each event adds its bytes and a comma
            while queue and len(batch) < self._batch_size and size + len(queue[0][2]) <= (
                    MAX_BATCH_BYTES):
                item = queue.popleft()
                batch.append(item)
                size += len(item[2]) + 1
                self._queued_bytes -= len(item[2])
            self._in_flight = batch
            return batch

    def _deliver(self, batch: list[_Item]) -> None:
        """Sends until every event is delivered, rejected or failed, retrying with backoff;
        returns early, with the rest in flight, once close() ran out of time."""
        attempt = 0
        while True:
            outcome = self._transport.send(batch)
            for index, reason in outcome.rejected[:10]:
                logger.warning("the endpoint rejected event %s: %s",
                               _event_id(batch[index][2]), reason)
            if outcome.failed is not None:
                logger.error("gave up %d events: %s", len(batch) - outcome.delivered,
                             outcome.failed)
            batch = outcome.retry
            with self._lock:  # counted and taken off in_flight at once: stats always add up
                counts = self._counts
                counts["failed"] += len(self._in_flight) - outcome.delivered - len(
                    outcome.rejected) - len(batch)
                counts["delivered"] += outcome.delivered
                counts["rejected"] += len(outcome.rejected)
                self._in_flight = batch
                if batch:
                    counts["retries"] += 1
            if not batch:
                return
            base, cap = self._backoff
            delay = max(outcome.retry_after, self._rng.uniform(0, min(cap, base * 2 ** attempt)))
            attempt += 1
            logger.warning("%d events not delivered (%s); retry %d in %.2f s", len(batch),
                           outcome.reason, attempt, delay)
            if self._stop.wait(delay):
                return


class _IngestResult(msgspec.Struct):
    """The 202 answer of POST /v1/events (DESIGN §8)."""

    accepted: int
    rejected: list[_Rejection]


class _Rejection(msgspec.Struct):
    index: int
    reason: str


class _ErrorBody(msgspec.Struct):
    error: _Error


class _Error(msgspec.Struct):
    code: str = ""
    message: str = ""


class _HTTP:
    """POST /v1/events over one keep-alive connection (http.client), reopened after an error."""

    def __init__(self, url: str, token: str, *, timeout: float, compress: bool) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = f"url must be http:// or https:// with a host, got {url!r}"
            raise ValueError(msg)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = parts.path.rstrip("/") + "/v1/events"
        self._timeout = timeout
        self._compress = compress
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                         "User-Agent": SDK_NAME}
        if compress:
            self._headers["Content-Encoding"] = "gzip"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout,
                    context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=self._timeout)
        return self._conn

    def send(self, batch: list[_Item]) -> _Outcome:
        body = b"[" + b",".join(item[2] for item in batch) + b"]"
        if self._compress:
            body = gzip.compress(body, compresslevel=1)
        for reused in (self._conn is not None, False):
            try:
                conn = self._connection()
                conn.request("POST", self._path, body, self._headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if reused and isinstance(exc, ConnectionError):
                    continue  # the server closed an idle keep-alive connection: once more, anew
                return _Outcome(retry=batch, reason=f"{type(exc).__name__}: {exc}")
            if response.will_close:
                self.close()
            return _answer(batch, response.status, data, response.getheader("Retry-After"))
        raise AssertionError  # pragma: no cover - the second pass always returns

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _answer(batch: list[_Item], status: int, data: bytes, retry_after: str | None) -> _Outcome:
    if status == 202:
        try:
            result = msgspec.json.decode(data, type=_IngestResult)
        except msgspec.DecodeError:
            logger.warning("unexpected 202 body; counting the batch as delivered")
            return _Outcome(delivered=len(batch))
        return _Outcome(delivered=result.accepted,
                        rejected=[(r.index, r.reason) for r in result.rejected
                                  if 0 <= r.index < len(batch)])
    try:
        message = msgspec.json.decode(data, type=_ErrorBody).error.message
    except msgspec.DecodeError:
        message = data[:200].decode(errors="replace")
    reason = f"HTTP {status}: {message}"
    if status in (408, 429) or status >= 500:
        return _Outcome(retry=batch, retry_after=_seconds(retry_after), reason=reason)
    return _Outcome(failed=reason)


def _seconds(retry_after: str | None) -> float:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; 0 if absent or bad."""
    if not retry_after:
        return 0.0
    text = retry_after.strip()
    if text.isdigit():
        return float(text)
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


class _Kafka:
    """Produces to usage.events keyed by user_id and waits for Kafka's confirmation; failed
    messages are retried by the client. confluent_kafka is imported only in this mode."""

    def __init__(self, settings: Settings, *, timeout: float) -> None:
        self._settings = settings
        self._topic = settings.topic(USAGE_EVENTS)
        self._timeout = timeout
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        from confluent_kafka import Producer  # only the Kafka mode needs it

        from core.kafka import producer_config

        return Producer(producer_config(self._settings, **{
            "message.timeout.ms": max(1, int(self._timeout * 1000)), "client.id": SDK_NAME}))

    def send(self, batch: list[_Item]) -> _Outcome:
        from confluent_kafka import KafkaException

        errors: dict[int, KafkaError] = {}
        confirmed = [0]

        def delivered(index: int, err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                confirmed[0] += 1
            else:
                errors[index] = err

        produced = 0
        reason = ""
        for index, (_seq, key, value) in enumerate(batch):
            try:
                self._producer.produce(self._topic, value, key,
                                       on_delivery=functools.partial(delivered, index))
            except (BufferError, KafkaException) as exc:
                reason = f"cannot produce: {exc}"
                break
            produced += 1
        # Every produced message gets its report within message.timeout.ms; waiting for all of
        # them means a retried event is never also still queued in the producer. One without a
        # report by then is counted as failed, not retried (it may still arrive).
        unreported = self._producer.flush(self._timeout + 5)
        if unreported:
            logger.error("Kafka gave no report for %d events in time", unreported)
        retry = [batch[i] for i in sorted(errors)] + batch[produced:]
        if errors:
            first = next(iter(errors.values()))
            reason = f"Kafka did not confirm {len(errors)} events: {first}"
            if any(err.fatal() for err in errors.values()):
                self._producer = self._new_producer()
        return _Outcome(delivered=confirmed[0], retry=retry, reason=reason)

    def close(self) -> None:
        self._producer.flush(self._timeout)


def _event_id(value: bytes) -> str:
    try:
        return str(msgspec.json.decode(value, type=dict[str, Any]).get("event_id"))
    except msgspec.DecodeError:  # pragma: no cover - the client encoded it
        return "?"

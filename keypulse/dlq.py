"""Dead letters for operators: read `usage.events.dlq`, and move records back to `usage.events`
(the logic behind `keypulse dlq`; docs/dead-letters.md).

A dead letter (pipeline/dead_letters.py) keeps the source record's key and value bytes; its
headers say why (`keypulse.reason`) and where it came from (`keypulse.source.topic`,
`keypulse.source.partition`, `keypulse.source.offset`). Those three are its *identity*: the
pipeline replays after a crash, so one source record can be dead-lettered twice, and both
copies have the same identity. A replay produces one record per identity, carrying it in
`keypulse.replay.origin`.

Replay remembers what it replayed in a ledger, the compacted topic
`usage.events.dlq.replayed` (key = identity), written after the replayed records are
confirmed; an identity in the ledger is never replayed again. Reading the DLQ commits
nothing; the replay group's offsets (`--group`) are committed last and only say how far a
replay has looked (lag = dead letters that arrived since).

The decisions are pure functions (`ReplayPolicy.decide`), the Kafka I/O is around them.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from core.errors import KeypulseError, ServiceError
from core.kafka import admin_config, consumer_config, producer_config
from core.settings import Settings
from schemas.events import (
    TS_BEYOND_RETENTION,
    TS_IN_FUTURE,
    InvalidEvent,
    decode_event,
    ts_bounds,
    ts_reason,
)

# The headers of a dead letter (written by pipeline/dead_letters.py and pipeline/sinks.py).
REASON = "keypulse.reason"
SOURCE_TOPIC = "keypulse.source.topic"
SOURCE_PARTITION = "keypulse.source.partition"
SOURCE_OFFSET = "keypulse.source.offset"
ERROR = "keypulse.error"
TABLE = "keypulse.table"
TRUNCATED = "keypulse.truncated"
# The headers of a replayed record on usage.events.
REPLAY_ORIGIN = "keypulse.replay.origin"
REPLAY_REASON = "keypulse.replay.reason"

REPLAYED = "usage.events.dlq.replayed"  # the ledger (compacted; key = identity)
DEFAULT_GROUP = "keypulse-dlq-replay"
STORAGE_ERROR = "storage_error"
EVENT_TABLES = ("usage_events_rows", "usage_events")  # storage_error values that are events

# Reasons whose record goes back as it is, once the cause is gone (the clock, the store).
AS_IS: dict[str, str] = {
    TS_IN_FUTURE: "admitted once its time is within the clock-skew bound of now",
    STORAGE_ERROR: "usage_events rows ClickHouse refused; replayed once past the dedup horizon",
}
# Reasons replayed as they are only when named with --reason: the pipeline's own limits.
ON_REQUEST: dict[str, str] = {
    TS_BEYOND_RETENTION: "admitted only if KEYPULSE_EVENTS_TTL_DAYS was raised",
    "too_many_services": "the per-user service cap refused it; it comes back as a late event",
}
NEVER_AS_IS: dict[str, str] = {
    "tombstone": "a tombstone holds no event",
    "publish_error": "an output record (stats, alert, notification), not a usage event",
}


class ReplayRefused(KeypulseError):
    """A replay asked for dead letters that cannot go back as they are."""


def reason_name(reason: str) -> str:
    """`ts_in_future: 1200 ms ahead…` → `ts_in_future`; `status_code: expected…` → `status_code`."""
    return reason.partition(":")[0].strip()


def reason_matches(reason: str, wanted: str | None) -> bool:
    """`wanted` is a reason's name (`ts` is not `ts_in_future`) or, with its `:`, the start of
    its text (`status_code: expected`)."""
    if wanted is None or reason_name(reason) == wanted:
        return True
    return ":" in wanted and reason.startswith(wanted)


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode(errors="replace")


def _encoded(data: bytes | None) -> tuple[str | None, str | None]:
    """(text, encoding): UTF-8 as text, anything else as base64."""
    if data is None:
        return None, None
    try:
        return data.decode(), "text"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode(), "base64"


def _decoded(text: Any, encoding: Any) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        msg = f"expected a string or null, got {type(text).__name__}"
        raise TypeError(msg)
    return base64.b64decode(text, validate=True) if encoding == "base64" else text.encode()


@dataclass(frozen=True)
class DeadLetterRecord:
    """One DLQ record: where it sits in the DLQ, its key, value and headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp_ms: int | None = None

    @classmethod
    def from_message(cls, message: Message) -> DeadLetterRecord:
        kind, ts = message.timestamp()
        headers = cast("list[tuple[str, str | bytes | None]]", message.headers() or [])
        return cls(
            str(message.topic()),
            int(message.partition() or 0),
            int(message.offset() or 0),
            _bytes(message.key()),
            _bytes(message.value()),
            tuple((name, _bytes(value)) for name, value in headers),
            ts if kind != 0 else None,
        )

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return _text(value)
        return None

    @property
    def reason(self) -> str:
        return self.header(REASON) or ""

    @property
    def origin(self) -> tuple[str, int, int] | None:
        """The source record's (topic, partition, offset), when the headers say."""
        topic, partition, offset = (
            self.header(SOURCE_TOPIC),
            self.header(SOURCE_PARTITION),
            self.header(SOURCE_OFFSET),
        )
        if topic is None or partition is None or offset is None:
            return None
        try:
            return topic, int(partition), int(offset)
        except ValueError:
            return None

    @property
    def identity(self) -> str:
        """`topic:partition:offset` of the source record (of the DLQ record without one)."""
        topic, partition, offset = self.origin or (self.topic, self.partition, self.offset)
        return f"{topic}:{partition}:{offset}"

    def to_json(self) -> dict[str, Any]:
        key, key_encoding = _encoded(self.key)
        value, value_encoding = _encoded(self.value)
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "identity": self.identity,
            "reason": self.reason,
            "headers": {name: _text(value) for name, value in self.headers},
            "key": key,
            "key_encoding": key_encoding,
            "value": value,
            "value_encoding": value_encoding,
        }

    @classmethod
    def from_json(cls, obj: Any) -> DeadLetterRecord:
        """A line of `keypulse dlq inspect --json` (ValueError when it is not one)."""
        if not isinstance(obj, dict):
            msg = "expected a JSON object"
            raise ValueError(msg)  # noqa: TRY004  # the caller reports ValueError per line
        headers = obj.get("headers")
        headers = {} if headers is None else headers
        if not isinstance(headers, dict):
            msg = "headers: expected an object"
            raise ValueError(msg)  # noqa: TRY004
        try:
            return cls(
                str(obj["topic"]),
                int(obj["partition"]),
                int(obj["offset"]),
                _decoded(obj.get("key"), obj.get("key_encoding")),
                _decoded(obj.get("value"), obj.get("value_encoding")),
                tuple(
                    (str(name), None if value is None else str(value).encode())
                    for name, value in headers.items()
                ),
                obj.get("timestamp_ms"),
            )
        except KeyError as exc:
            msg = f"missing field {exc.args[0]!r}"
            raise ValueError(msg) from None
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def check_replayable(reason: str | None) -> None:
    """ReplayRefused when `--reason` names dead letters that cannot go back as they are."""
    if reason is None:
        return
    name = reason_name(reason)
    if name in AS_IS or name in ON_REQUEST:
        return
    why = NEVER_AS_IS.get(name, "the same bytes would be refused again")
    msg = (
        f"dead letters with reason {reason!r} are not replayable as they are ({why}); "
        f"print them with `keypulse dlq inspect --reason {reason} --json > fixed.jsonl`, "
        "fix the values, then `keypulse dlq replay --from-file fixed.jsonl`"
    )
    raise ReplayRefused(msg)


@dataclass
class ReplayPolicy:
    """Decides, record by record, whether a dead letter goes back to `events_topic`.

    `decide` answers None (replay it) or why not; it remembers the identities it has passed
    (or that `done` holds: the ledger), so a second copy of a dead letter is skipped."""

    events_topic: str
    now_ms: int
    max_clock_skew_seconds: int
    events_ttl_days: int
    dedup_horizon_seconds: int
    reason: str | None = None
    from_file: bool = False
    done: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)

    def decide(self, record: DeadLetterRecord) -> str | None:
        reason, identity = record.reason, record.identity
        if identity in self.seen:
            return "duplicate"
        self.seen.add(identity)
        if not reason_matches(reason, self.reason):
            return "other reason"
        if identity in self.done:
            return "already replayed"
        name = reason_name(reason)
        if not self.from_file:
            if name in NEVER_AS_IS or (name not in AS_IS and name not in ON_REQUEST):
                return f"needs a fix ({name or 'no reason'})"
            if name in ON_REQUEST and self.reason is None:
                return f"only with --reason ({name})"
        table = record.header(TABLE)
        if name == STORAGE_ERROR and table and table.rpartition(".")[2] not in EVENT_TABLES:
            return f"not a usage event ({table.rpartition('.')[2]})"
        origin = record.origin
        if origin is None:
            return "no source record"  # an output record (publish_error)
        if origin[0] != self.events_topic:
            return "from another topic"
        if record.header(TRUNCATED) == "1" and not self.from_file:
            return "truncated"
        if record.value is None:
            return "tombstone"
        try:
            event = decode_event(record.value)
        except InvalidEvent as exc:
            return f"invalid ({reason_name(exc.reason)})"
        oldest, newest = ts_bounds(self.now_ms, self.max_clock_skew_seconds, self.events_ttl_days)
        ts_ms = event.ts_ms
        if not oldest <= ts_ms <= newest:
            return "still " + reason_name(
                ts_reason(ts_ms, self.now_ms, self.max_clock_skew_seconds, self.events_ttl_days)
            )
        if (
            name == STORAGE_ERROR
            and not self.from_file
            and ts_ms > self.now_ms - self.dedup_horizon_seconds * 1000
        ):
            # The pipeline counted it and holds its id: it would be dropped as a duplicate.
            return "within the dedup horizon"
        return None


def replay_headers(record: DeadLetterRecord) -> list[tuple[str, str | bytes | None]]:
    return [(REPLAY_ORIGIN, record.identity.encode()), (REPLAY_REASON, record.reason.encode())]


@dataclass
class Summary:
    read: int = 0
    replayed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def distinct(self) -> int:
        return self.read - self.skipped["duplicate"]

    def line(self, dry_run: bool) -> str:
        skipped = sum(self.skipped.values())
        details = ", ".join(f"{why}: {n}" for why, n in sorted(self.skipped.items()))
        verb = "would replay" if dry_run else "replayed"
        return (
            f"read {self.read}, distinct {self.distinct}, {verb} {self.replayed}, "
            f"skipped {skipped}" + (f" ({details})" if details else "")
        )


# -- Kafka --------------------------------------------------------------------------------------


class Progress:
    """A status line on stderr every `every` seconds while a long read goes on."""

    def __init__(
        self,
        what: str,
        total: int,
        out: IO[str] = sys.stderr,
        every: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.out, self.every, self.clock = what, total, out, every, clock
        self.next_at = clock() + every

    def maybe(self, done: int) -> None:
        if self.clock() >= self.next_at:
            self.next_at = self.clock() + self.every
            share = f" ({100 * done // self.total} %)" if self.total else ""
            print(f"{self.what}: {done} of {self.total} records{share}", file=self.out, flush=True)


def read_topic(
    settings: Settings,
    topic: str,
    *,
    group: str = "keypulse-dlq-inspect",
    progress: Progress | None = None,
    consumer: Consumer | None = None,
    timeout: float = 30.0,
) -> Iterator[DeadLetterRecord]:
    """Every record of `topic` (physical name) from the beginning to its end as it is now;
    nothing is committed. With `consumer`, that consumer is used (and left open)."""
    own = consumer is None
    reader = consumer or Consumer(
        consumer_config(settings, group_id=group, **{"enable.partition.eof": True})
    )
    try:
        metadata = reader.list_topics(topic, timeout=10)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            msg = f"Kafka topic {topic} is not there: {info.error if info else 'unknown'}"
            raise ServiceError(msg)
        assigned, total = [], 0
        for partition in sorted(info.partitions):
            low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > low:
                assigned.append(TopicPartition(topic, partition, low))
                total += high - low
        if progress is not None:
            progress.total = total
        if not assigned:
            return
        reader.assign(assigned)
        pending = {tp.partition for tp in assigned}
        count, deadline = 0, time.monotonic() + timeout
        while pending:
            messages = reader.consume(500, timeout=0.5)
            if not messages and time.monotonic() > deadline:
                msg = f"reading {topic}: no records for {timeout:.0f} s before its end"
                raise ServiceError(msg)
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(int(message.partition() or 0))
                        continue
                    msg = f"reading {topic}: {error.str()}"
                    raise ServiceError(msg)
                deadline = time.monotonic() + timeout
                count += 1
                yield DeadLetterRecord.from_message(message)
            if progress is not None:
                progress.maybe(count)
    except KafkaException as exc:
        msg = f"reading {topic}: {exc}"
        raise ServiceError(msg) from None
    finally:
        if own:
            reader.close()


def ensure_ledger(settings: Settings, timeout: float = 30.0) -> str:
    """The ledger topic's name, created (compacted, one partition) when missing."""
    name = settings.topic(REPLAYED)
    admin = AdminClient(admin_config(settings))
    try:
        if name in admin.list_topics(timeout=timeout).topics:
            return name
        spec = NewTopic(
            name,
            num_partitions=1,
            replication_factor=-1,
            config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
        )
        admin.create_topics([spec], operation_timeout=timeout)[name].result(timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if not (isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            msg = f"creating the replay ledger {name} failed: {exc}"
            raise ServiceError(msg) from None
    return name


def read_ledger(settings: Settings) -> set[str]:
    """The identities replayed before (empty when the ledger does not exist yet)."""
    name = settings.topic(REPLAYED)
    admin = AdminClient(admin_config(settings))
    try:
        if name not in admin.list_topics(timeout=10).topics:
            return set()
    except KafkaException as exc:
        msg = f"Kafka at {settings.kafka_bootstrap} did not answer: {exc}"
        raise ServiceError(msg) from None
    done: set[str] = set()
    for record in read_topic(settings, name, group="keypulse-dlq-ledger"):
        if record.key is not None:
            if record.value is None:
                done.discard(record.key.decode())  # a tombstone: replayable again
            else:
                done.add(record.key.decode())
    return done


class Replayer:
    """Produces replayed records, then their ledger entries, then commits the group's offsets,
    each step only after the previous one is confirmed by the broker."""

    def __init__(
        self,
        settings: Settings,
        events_topic: str,
        ledger: str,
        consumer: Consumer | None = None,
        dlq_topic: str = "",
    ) -> None:
        self.producer = Producer(producer_config(settings, **{"linger.ms": 20}))
        self.events_topic, self.ledger = events_topic, ledger
        self.consumer, self.dlq_topic = consumer, dlq_topic
        self.failures: list[str] = []

    def send(self, batch: Iterable[DeadLetterRecord], positions: dict[int, int]) -> int:
        """Replays `batch` (one record per identity already); commits `positions` (DLQ
        partition → next offset) when everything was confirmed. Returns how many went."""
        delivered: dict[str, str] = {}

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            origin = dict(msg.headers() or ()).get(REPLAY_ORIGIN)
            if err is not None:
                self.failures.append(err.str())
            elif origin is not None:
                delivered[_text(_bytes(origin)) or ""] = (
                    f"{msg.topic()}:{msg.partition()}:{msg.offset()}"
                )

        records = list(batch)
        for record in records:
            self._produce(
                self.events_topic, record.value, record.key, replay_headers(record), on_delivery
            )
        self._flush()
        if self.failures:
            msg = f"replaying to {self.events_topic} failed: {self.failures[0]}"
            raise ServiceError(msg)
        now_ms = int(time.time() * 1000)
        for record in records:
            entry = {
                "replayed_at_ms": now_ms,
                "reason": record.reason,
                "to": delivered.get(record.identity),
            }
            self._produce(
                self.ledger, json.dumps(entry).encode(), record.identity.encode(), None, None
            )
        self._flush()
        if self.consumer is not None and positions:
            offsets = [TopicPartition(self.dlq_topic, p, o) for p, o in sorted(positions.items())]
            self.consumer.commit(offsets=offsets, asynchronous=False)
        return len(records)

    def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, str | bytes | None]] | None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None,
    ) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _flush(self) -> None:
        remaining = self.producer.flush(60)
        if remaining:
            msg = f"{remaining} records not confirmed by Kafka within 60 s"
            raise ServiceError(msg)

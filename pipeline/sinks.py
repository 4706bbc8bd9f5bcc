"""The dataflow's one sink: ClickHouse tables and Kafka topics, flushed before each snapshot.

Bytewax snapshots a sink partition at the end of every epoch and treats everything written
before as delivered, so `snapshot()` flushes: event rows are buffered up to `max_rows` or
`max_age_s` and never survive a snapshot unwritten. After a crash the dataflow replays from
the last snapshot; ReplacingMergeTree keys make the replayed rows replace their twins, and
Kafka outputs carry deterministic ids (alert_id, notification_id, window key).

Records read from `notifications` and `apikey.events` (pipeline/records.py: notifications,
read-state changes, deletions, API-key events, whoever produced them) are only stored, never
published again, batched like alerts. The notifications the sink publishes itself carry
`STORED_HEADER`: they are in ClickHouse already, and the records input reads past them.

With the embedded ClickHouse only one process may open the database, so there is one sink
partition and Bytewax routes every output to the worker that owns it; with a server DSN
there is one partition per worker and all of them write.

After a batch of stats rows is stored (and published), the 1 m / 1 h / 1 d rollups of the
buckets it touched are recomputed from the stored windows, each level at its own pace; the
buckets waiting are the sink's snapshot state (pipeline/rollups.py). A recompute is tried like
an insert; one that fails every attempt is logged and counted (`rollup_failures`) and does not
fail the batch: the windows, the source of truth, are stored, and stopping the dataflow for a
derived table would stop everything. Its buckets wait for the level's next turn.

A storage failure is one batch's problem, never the dataflow's: a failed insert is tried
`insert_attempts` times with backoff, then its rows go to `usage.events.dlq` (reason
`storage_error`, the engine's error in `keypulse.error`, the table in `keypulse.table`) and
the writer goes on. A replay of the same failure dead-letters the same rows again. Stats,
alerts and notifications reach Kafka only once queryable, so dead-lettered ones are not
published (counted in `stats_unpublished`). The DLQ itself always takes a record: one too
large for it is stored truncated, with its original size and SHA-256 in headers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from clickhouse_connect.driver.client import Client
from confluent_kafka import KafkaException, Producer

from core import topics
from core.clock import to_ms
from core.outputs import (
    ALERT_RULES_OUTPUT,
    ALERTS_OUTPUT,
    API_KEY_EVENTS_OUTPUT,
    EVENT_ROWS_OUTPUT,
    NOTIFICATION_DELETES_OUTPUT,
    NOTIFICATION_READS_OUTPUT,
    NOTIFICATIONS_OUTPUT,
    ONE_THREAD,
    USAGE_STATS_OUTPUT,
    Output,
    insert,
)
from pipeline import rollups
from pipeline.dead_letters import (
    DEFAULT_MESSAGE_MAX_BYTES,
    ERROR_MAX_CHARS,
    DeadLetterWriter,
    Headers,
    dead_letter_headers,
    first_line,
)
from pipeline.items import PartitionOutput
from pipeline.metrics import METRICS, PipelineMetrics
from pipeline.rows import encode_rows
from pipeline.windows import NO_WINDOW

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()

STORED_HEADER = "keypulse.stored"
"""On a notification the sink publishes: it is in ClickHouse already, so the records input
(pipeline/records.py) reads past it instead of inserting the same row again."""
_STORED: Headers = [(STORED_HEADER, b"1")]


class OutputSink(FixedPartitionedSink[PartitionOutput, rollups.PendingState | None]):
    def __init__(
        self,
        client_factory: Callable[[], Client],
        producer_config: dict[str, Any],
        topic_name: Callable[[str], str],
        database: str,
        *,
        writers: int = 1,
        local_writers: list[int] | None = None,
        max_rows: int = 50_000,
        max_age_s: float = 0.5,
        insert_attempts: int = 3,
        retry_backoff_s: float = 0.2,
        metrics: PipelineMetrics = METRICS,
    ) -> None:
        self.client_factory = client_factory
        self.producer_config = producer_config
        self.topic_name = topic_name
        self.database = database
        self.writers = writers
        self.local_writers = list(range(writers)) if local_writers is None else local_writers
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.insert_attempts = max(1, insert_attempts)
        self.retry_backoff_s = retry_backoff_s  # doubled after each failed attempt
        self.metrics = metrics

    def list_parts(self) -> list[str]:
        # A process lists only the writers it owns: with embedded ClickHouse that is
        # writer-0 on process 0 alone, the process that has the database open.
        return [f"writer-{i}" for i in self.local_writers]

    def part_fn(self, item_key: str) -> int:
        return int(item_key) if item_key.isdigit() else 0

    def build_part(self, step_id: str, for_part: str,
                   resume_state: rollups.PendingState | None) -> OutputPartition:
        # None: a fresh start, or a snapshot of a release whose sink kept no state.
        return OutputPartition(self, resume_state)


class OutputPartition(StatefulSinkPartition[PartitionOutput, rollups.PendingState | None]):
    """Buffers event rows; a writer thread performs the inserts in order.

    ClickHouse does most of an insert in C++ without the GIL, so the writer thread overlaps
    it with the dataflow's Python work. The jobs queue is short (back-pressure), runs FIFO
    (a stats row is never written before the events of its window), and `snapshot()` waits
    for it to drain: what Bytewax considers delivered is in ClickHouse and Kafka (or, when
    ClickHouse refused it, in the DLQ).
    """

    def __init__(self, sink: OutputSink, resume_state: rollups.PendingState | None = None
                 ) -> None:
        self.sink = sink
        self.metrics = sink.metrics
        self.client: Client  # opened by the writer thread: ClickHouse may still be migrating
        self.producer = Producer(sink.producer_config)
        self.chunks: list[bytes] = []  # encoded event rows (EventRows.data)
        self.buffered_rows = 0
        self.buffered_from_ms = NO_WINDOW  # the earliest window the buffered rows count in
        self.first_buffered = 0.0
        self.alerts: list[Any] = []
        self.notifications: list[Any] = []
        self.alerts_buffered = 0.0
        # Records read from notifications / apikey.events: stored, not published again.
        self.records: dict[Output, list[Any]] = {}
        self.records_buffered = 0.0
        self.source_topic = sink.topic_name(topics.USAGE_EVENTS)
        self.dlq = DeadLetterWriter(
            self.producer, sink.topic_name(topics.USAGE_EVENTS_DLQ), sink.metrics,
            int(sink.producer_config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)))
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=3)
        # Rollup buckets waiting for a recompute: touched by the writer thread only, read by
        # snapshot() once the writer is idle.
        self.rollups = rollups.Pending(resume_state)
        self.rollup_intervals = rollups.INTERVALS_S
        self.rollups_polled = 0.0  # when the dataflow's thread last asked for a recompute
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="keypulse-writer", daemon=True)
        self.thread.start()

    def write_batch(self, values: list[PartitionOutput]) -> None:
        self._raise_writer_error()
        stats: list[Any] = []
        alerts: list[Any] = []
        notifications: list[Any] = []
        rule_rows: list[tuple[Any, ...]] = []
        for out in values:
            rule_rows.extend(out.rule_rows)
            for chunk in out.event_rows:
                if not self.chunks:
                    self.first_buffered = time.monotonic()
                self.chunks.append(chunk.data)
                self.buffered_rows += chunk.rows
                self.buffered_from_ms = min(self.buffered_from_ms, chunk.first_window_ms)
            stats.extend(out.stats)
            alerts.extend(out.alerts)
            notifications.extend(out.notifications)
            for dead in out.dead_letters:
                self.dlq.write(dead.key, dead.value,
                                  dead_letter_headers(dead, self.source_topic))
            if (out.stored_notifications or out.notification_reads or out.notification_deletes
                    or out.api_key_events):
                self._buffer_records(out)
        if stats:
            # The events of closing windows go first. Live, the buffer holds the last half
            # second, all of it in later windows: then the stats go ahead of it.
            if self.buffered_from_ms <= to_ms(max(record.window_start for record in stats)):
                self._submit_rows()
            self.jobs.put(lambda: self._write_records(USAGE_STATS_OUTPUT, stats))
        if self.buffered_rows >= self.sink.max_rows or (
            self.chunks and time.monotonic() - self.first_buffered >= self.sink.max_age_s
        ):
            self._submit_rows()
        if alerts or notifications:
            if not self.alerts and not self.notifications:
                self.alerts_buffered = time.monotonic()
            self.alerts.extend(alerts)
            self.notifications.extend(notifications)
        if (self.alerts or self.notifications) and (
            time.monotonic() - self.alerts_buffered >= self.sink.max_age_s
        ):
            self._submit_alerts()
        if self.records and time.monotonic() - self.records_buffered >= self.sink.max_age_s:
            self._submit_records()
        if rule_rows:
            self.jobs.put(lambda: self._insert_rules(rule_rows))
        if time.monotonic() - self.rollups_polled >= self.rollup_intervals[0]:
            # Waiting rollups get their turn without waiting for the next stats batch.
            self.rollups_polled = time.monotonic()
            self.jobs.put(self._refresh_rollups)
        self.producer.poll(0)

    def snapshot(self) -> rollups.PendingState:
        self._drain()
        return self.rollups.state()  # the writer is idle: the drain waited for its jobs

    def close(self) -> None:
        try:
            self._drain(final=True)
        finally:
            self.jobs.put(None)
            self.thread.join(timeout=60)

    # -- writing (in the writer thread) -----------------------------------------------------

    def _work(self) -> None:
        try:
            self.client = self.sink.client_factory()
        except BaseException as exc:  # surfaced in the dataflow's thread
            self.error = exc
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job()
            except BaseException as exc:  # surfaced in the dataflow's thread
                logger.exception("writer failed")
                self.error = exc
            finally:
                self.jobs.task_done()

    def _insert(self, output: Output, data: bytes, rows: int) -> str | None:
        """Insert with retries and backoff. None once stored; else the engine's last error,
        after `insert_attempts` failures (the caller dead-letters the batch)."""
        table = output.qualified_table(self.sink.database)
        attempts = self.sink.insert_attempts
        for attempt in range(1, attempts + 1):
            try:
                insert(self.client, output, self.sink.database, data)
                return None
            except Exception as exc:  # clickhouse-connect and chDB raise unrelated types
                error = first_line(exc)
                if attempt == attempts:
                    logger.exception("insert of %s rows into %s failed %s times, "
                                     "dead-lettered: %s", rows, table, attempts, error)
                    return error
                logger.warning("insert of %s rows into %s failed (attempt %s of %s): %s",
                               rows, table, attempt, attempts, error)
                self.metrics.add(insert_retries=1)
                time.sleep(self.sink.retry_backoff_s * 2 ** (attempt - 1))
        return None  # not reached: attempts >= 1

    def _insert_rules(self, rows: list[tuple[Any, ...]]) -> None:
        # As JSON, like every other table: client.insert() would import pandas (0.3 s) and
        # serialise the rows in Python.
        error = self._insert(ALERT_RULES_OUTPUT, encode_rows(rows), len(rows))
        if error is not None:
            self._dead_letter_rows(ALERT_RULES_OUTPUT, rows, error)

    def _insert_events(self, data: bytes, count: int) -> None:
        started = time.perf_counter()
        error = self._insert(EVENT_ROWS_OUTPUT, data, count)
        if error is None:
            self.metrics.record_insert(count, 0, time.perf_counter() - started, events=data)
        else:
            rows = [msgspec.json.decode(line) for line in data.splitlines() if line]
            self._dead_letter_rows(EVENT_ROWS_OUTPUT, rows, error)

    def _write_records(self, output: Output, records: list[Any], *, publish: bool = True
                       ) -> None:
        """Stats, alerts or notifications as the JSON also published on Kafka (one encoding,
        parsed in C++), published only once queryable in ClickHouse. Records read from Kafka
        (`publish=False`) are only stored."""
        started = time.perf_counter()
        encoded = [_encoder.encode(record) for record in records]
        error = self._insert(output, b"\n".join(encoded), len(records))
        if error is not None:
            self._dead_letter_records(output, records, encoded, error)
            return
        if not publish:
            return
        if output is USAGE_STATS_OUTPUT:
            self.metrics.record_insert(0, len(records), time.perf_counter() - started)
        topic = self.sink.topic_name(output.topic)
        headers = _STORED if output is NOTIFICATIONS_OUTPUT else None
        for record, value in zip(records, encoded, strict=True):
            self._publish(topic, record.user_id.encode(), value, headers)
        if output is USAGE_STATS_OUTPUT:
            self.rollups.mark(rollups.minutes_of(record.window_start for record in records))
            self._refresh_rollups()

    def _refresh_rollups(self, force: bool = False) -> None:
        """Recompute each rollup level whose turn it is (every waiting bucket if `force`),
        finest first, each tried like an insert. A level that fails every attempt keeps its
        buckets waiting for its next turn, and the coarser levels wait for it."""
        for level in range(len(rollups.LEVEL_SECONDS)):
            now = time.monotonic()
            buckets = self.rollups.due(level, now, self.rollup_intervals, force)
            if not buckets:
                continue
            started = time.perf_counter()
            error = self._attempt_rollup(level, buckets)
            if error is not None:
                logger.error("recomputing %s rollup buckets of %s failed %s times, tried again "
                             "at its next turn: %s", len(buckets), rollups.ROLLUP_TABLES[level],
                             self.sink.insert_attempts, error)
                self.metrics.add(rollup_failures=1)
                self.rollups.failed(level, time.monotonic())
                return
            self.rollups.done(level, buckets, time.monotonic())
            self.metrics.record_rollup(time.perf_counter() - started)

    def _attempt_rollup(self, level: int, buckets: set[int]) -> str | None:
        """None once recomputed; else the engine's last error after every attempt."""
        attempts = self.sink.insert_attempts
        for attempt in range(1, attempts + 1):
            try:
                rollups.refresh(self.client, self.sink.database, level, buckets, ONE_THREAD)
                return None
            except Exception as exc:  # clickhouse-connect and chDB raise unrelated types
                error = first_line(exc)
                if attempt == attempts:
                    return error
                logger.warning("recomputing rollups failed (attempt %s of %s): %s",
                               attempt, attempts, error)
                time.sleep(self.sink.retry_backoff_s * 2 ** (attempt - 1))
        return None  # not reached: attempts >= 1

    def _write_alerts(self, alerts: list[Any], notifications: list[Any]) -> None:
        if alerts:
            self._write_records(ALERTS_OUTPUT, alerts)
        if notifications:
            self._write_records(NOTIFICATIONS_OUTPUT, notifications)

    def _store_records(self, records: dict[Output, list[Any]]) -> None:
        for output, batch in records.items():
            self._write_records(output, batch, publish=False)

    def _dead_letter_records(
        self, output: Output, records: list[Any], encoded: list[bytes], error: str
    ) -> None:
        """Records the engine refused → DLQ, as the JSON they would have been published as."""
        headers = self._storage_headers(output, error)
        headers.append(("keypulse.output.topic", self.sink.topic_name(output.topic).encode()))
        for record, value in zip(records, encoded, strict=True):
            self.dlq.write(record.user_id.encode(), value, headers)
        self.metrics.add(storage_dead_lettered=len(records))
        if output is USAGE_STATS_OUTPUT:
            self.metrics.add(stats_unpublished=len(records))

    def _dead_letter_rows(self, output: Output, rows: list[Any], error: str) -> None:
        """Positional rows the engine refused → DLQ, one JSON object per row keyed by column.

        An event row's object holds every field of the usage event, so it can be re-driven
        to `usage.events` as it is (the decoder ignores the pipeline's extra columns)."""
        headers = self._storage_headers(output, error)
        columns = output.columns
        key_column = "user_id" if output is EVENT_ROWS_OUTPUT else "rule_id"
        for row in rows:
            named = dict(zip(columns, row, strict=False))
            row_headers = headers
            if output is EVENT_ROWS_OUTPUT:
                row_headers = [*headers,
                               ("keypulse.source.topic", self.source_topic.encode()),
                               ("keypulse.source.partition",
                                str(named["kafka_partition"]).encode()),
                               ("keypulse.source.offset", str(named["kafka_offset"]).encode())]
            key = str(named.get(key_column, "")).encode()
            self.dlq.write(key, _encoder.encode(named), row_headers)
        self.metrics.add(storage_dead_lettered=len(rows))

    def _storage_headers(self, output: Output, error: str) -> Headers:
        return [
            ("keypulse.reason", b"storage_error"),
            ("keypulse.error", error[:ERROR_MAX_CHARS].encode()),
            ("keypulse.table", output.qualified_table(self.sink.database).encode()),
        ]

    # -- in the dataflow's thread -------------------------------------------------------------

    def _submit_rows(self) -> None:
        if self.chunks:
            data, count = b"".join(self.chunks), self.buffered_rows
            self.chunks, self.buffered_rows, self.buffered_from_ms = [], 0, NO_WINDOW
            self.jobs.put(lambda: self._insert_events(data, count))

    def _submit_alerts(self) -> None:
        """Alerts are rare but come in bursts: batched up to `max_age_s`, like event rows."""
        alerts, self.alerts = self.alerts, []
        notifications, self.notifications = self.notifications, []
        if alerts or notifications:
            self.jobs.put(lambda: self._write_alerts(alerts, notifications))

    def _buffer_records(self, out: PartitionOutput) -> None:
        """Low volume, so batched up to `max_age_s` like alerts: one insert per table."""
        if not self.records:
            self.records_buffered = time.monotonic()
        for output, batch in ((NOTIFICATIONS_OUTPUT, out.stored_notifications),
                              (NOTIFICATION_READS_OUTPUT, out.notification_reads),
                              (NOTIFICATION_DELETES_OUTPUT, out.notification_deletes),
                              (API_KEY_EVENTS_OUTPUT, out.api_key_events)):
            if batch:
                self.records.setdefault(output, []).extend(batch)

    def _submit_records(self) -> None:
        records, self.records = self.records, {}
        if records:
            self.jobs.put(lambda: self._store_records(records))

    def _drain(self, final: bool = False) -> None:
        self._submit_rows()
        self._submit_alerts()
        self._submit_records()
        # The levels whose turn it is; at a clean stop, every bucket waiting.
        self.jobs.put(lambda: self._refresh_rollups(force=final))
        self.jobs.join()
        self._raise_writer_error()
        remaining = self.producer.flush(30)
        if remaining:
            msg = f"{remaining} Kafka messages not delivered within 30 s"
            raise RuntimeError(msg)

    def _raise_writer_error(self) -> None:
        if self.error is not None:
            msg = f"writing to ClickHouse/Kafka failed: {self.error}"
            raise RuntimeError(msg) from self.error

    # -- Kafka (either thread: the producer is thread-safe) -----------------------------------

    def _publish(self, topic: str, key: bytes, value: bytes, headers: Headers | None = None
                 ) -> None:
        """An output record; one the producer refuses goes to the DLQ (reason `publish_error`)."""
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:  # the local queue is full: wait for deliveries, never drop
                self.producer.poll(0.05)
            except KafkaException as exc:
                error = first_line(exc)
                logger.exception("publishing to %s failed, dead-lettered: %s", topic, error)
                self.dlq.write(key, value, [
                    ("keypulse.reason", b"publish_error"),
                    ("keypulse.error", error[:ERROR_MAX_CHARS].encode()),
                    ("keypulse.output.topic", topic.encode()),
                ])
                return

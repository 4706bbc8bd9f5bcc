"""Run the dataflow on Kafka and ClickHouse: always with recovery, alone or as a cluster.

Bytewax's Kafka offsets live only in its recovery snapshots, so a run without recovery
would re-read the whole topic; `run_pipeline` therefore always runs with recovery under
`KEYPULSE_DATA_DIR/recovery` (created on first start) and resumes from the last snapshot.

Death is loud: each run has its own stop event; standalone, SIGINT/SIGTERM set it, and a
second signal or a dataflow that does not stop within `stop_timeout` seconds ends the
process (see `stop_on_signals`). Embedded (`EmbeddedPipeline`), the serving process watches
the thread, and `PipelineHealth` tells a stuck dataflow from a quiet one for `/healthz`.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import wait
from datetime import timedelta
from typing import NoReturn

from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.recovery import RecoveryConfig, init_db_dir

from core import templates, topics
from core.clickhouse import Migrator, prepare
from core.clock import Clock, system_clock
from core.errors import ServiceError
from core.kafka import consumer_config, producer_config
from core.settings import Settings
from pipeline.alerting.hook import AlertingHook
from pipeline.flow import build_flow
from pipeline.kafka_source import KafkaBatchSource, KafkaTopicsSource, list_partitions
from pipeline.metrics import METRICS, PipelineMetrics
from pipeline.processor import ProcessorConfig
from pipeline.records import TOPICS as RECORD_TOPICS
from pipeline.sinks import STORED_HEADER, OutputSink

logger = logging.getLogger(__name__)

RECORDS_TICK_MS = 60_000  # the records input needs no idle ticks (no windows to close)


def processor_config(settings: Settings, partitions: int | None = None) -> ProcessorConfig:
    """`partitions`: of the events topic (default: the number topics are created with);
    `dedup_max_ids` is a total that the partitions share."""
    return ProcessorConfig(
        window_seconds=settings.window_seconds,
        allowed_lateness_seconds=settings.allowed_lateness_seconds,
        dedup_horizon_seconds=settings.dedup_horizon_seconds,
        dedup_max_ids=settings.dedup_max_ids,
        dedup_dir=settings.data_dir / "dedup",
        partitions=partitions if partitions is not None else settings.topic_partitions,
        max_clock_skew_seconds=settings.max_clock_skew_seconds,
        events_ttl_days=settings.events_ttl_days,
        max_services_per_user=settings.max_services_per_user,
    )


def kafka_flow(
    settings: Settings,
    *,
    processes: int = 1,
    process_id: int = 0,
    alerts: bool = True,
    migrate: Migrator | None = None,
    stop: threading.Event | None = None,
) -> Dataflow:
    """The production dataflow: Kafka in, ClickHouse and Kafka out. Process 0 applies
    `migrate` (the CLI passes `infra.clickhouse.migrate.migrate`) before its first write.
    Setting `stop` ends every source partition after its current batch. The notification
    templates are loaded (and checked: `ConfigError`) here, once."""
    registry = templates.load(settings.notification_templates_file)  # ConfigError: at start
    stop = stop if stop is not None else threading.Event()
    consumer = consumer_config(settings, group_id="keypulse-pipeline")
    events_topic = settings.topic(topics.USAGE_EVENTS)
    partitions = list_partitions(consumer, events_topic)
    source = KafkaBatchSource(consumer, events_topic, partitions=partitions, stop=stop,
                              metrics=METRICS)
    rules_topic = settings.topic(topics.ALERT_RULES)
    rules = KafkaBatchSource(
        consumer, rules_topic, partitions=list_partitions(consumer, rules_topic), stop=stop
    )
    records = KafkaTopicsSource({name: KafkaBatchSource(
        consumer, settings.topic(name), partitions=list_partitions(consumer, settings.topic(name)),
        stop=stop, tick_ms=RECORDS_TICK_MS,
        # The sink's own notifications are in ClickHouse before they are published.
        skip_header=STORED_HEADER if name == topics.NOTIFICATIONS else None,
    ) for name in RECORD_TOPICS})
    sink = OutputSink(
        client_factory=lambda: prepare(settings, migrate if process_id == 0 else None).result(),
        producer_config=producer_config(settings),
        topic_name=settings.topic,
        database=settings.clickhouse_database,
        writers=1 if settings.embedded else processes,
        local_writers=[0] if process_id == 0 else [] if settings.embedded else [process_id],
        insert_attempts=settings.insert_attempts,
    )
    return build_flow(
        source,
        sink,
        processor_config(settings, len(partitions)),
        partitions=partitions,
        rules=rules if alerts else None,
        hook_factory=AlertingHook.factory(settings.state_idle_seconds, templates=registry)
        if alerts else None,
        templates=registry,
        records=records,
        flow_id="keypulse",
    )


def recovery_config(settings: Settings, partitions: int, *, create: bool = True
                    ) -> RecoveryConfig:
    """The recovery store; process 0 creates it, the others wait for it."""
    path = settings.data_dir / "recovery"
    deadline = time.monotonic() + 60
    while not create and not any(path.glob("part-*.sqlite3")):
        if time.monotonic() > deadline:
            msg = f"no recovery store at {path}: is process 0 of the cluster running?"
            raise ServiceError(msg)
        time.sleep(0.2)
    if not any(path.glob("part-*.sqlite3")):
        path.mkdir(parents=True, exist_ok=True)
        init_db_dir(path, partitions)
        logger.info("created recovery store %s (%s partitions)", path, partitions)
    return RecoveryConfig(path)


def run_pipeline(
    settings: Settings,
    *,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    epoch_seconds: float = 10.0,
    alerts: bool = True,
    handle_signals: bool = True,
    migrate: Migrator | None = None,
    stop: threading.Event | None = None,
    stop_timeout: float = 30.0,
) -> None:
    """Run this process's share of the dataflow until `stop` is set (with `handle_signals`:
    until SIGINT/SIGTERM, see `stop_on_signals`). Process 0 applies `migrate` to ClickHouse
    before its first write. A dataflow that fails raises `PipelineFailed`."""
    from bytewax._bytewax import cli_main

    stop = stop if stop is not None else threading.Event()
    if handle_signals:
        stop_on_signals(stop, stop_timeout)
    processes = len(addresses) if addresses else 1
    writes = not process_id or not settings.embedded  # embedded: process 0 alone opens it
    # Opening and migrating ClickHouse overlaps the dataflow's start; the writer waits for it.
    clickhouse = prepare(settings, None if process_id else migrate) if writes else None
    flow = kafka_flow(settings, processes=processes, process_id=process_id or 0, alerts=alerts,
                      migrate=migrate, stop=stop)
    recovery = recovery_config(settings, max(processes, 1), create=not process_id)
    # The dataflow allocates millions of short-lived tuples and keeps long-lived state with
    # no reference cycles: the default GC thresholds spent a quarter of the CPU scanning it.
    gc.freeze()
    gc.set_threshold(200_000, 50, 1000)
    logger.info(
        "pipeline %s/%s: %s → ClickHouse %s",
        (process_id or 0) + 1,
        processes,
        settings.topic(topics.USAGE_EVENTS),
        "embedded" if settings.embedded else "server",
    )
    try:
        cli_main(
            flow,
            workers_per_process=1,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=timedelta(seconds=epoch_seconds),
            recovery_config=recovery,
        )
    except BytewaxRuntimeError as exc:
        failed = clickhouse.exception() if clickhouse is not None and clickhouse.done() else None
        if failed is not None:  # say what was wrong with ClickHouse, not where it surfaced
            raise failed from None
        if "signal received" not in str(exc):
            msg = f"the dataflow failed: {_first_line(exc)}"
            raise PipelineFailed(msg) from exc
    except BaseException as exc:
        # A panic in Bytewax's Rust (a peer of the cluster died: "Send thread panic") comes
        # as pyo3's PanicException, a BaseException that `except Exception` lets through.
        if type(exc).__name__ != "PanicException":
            raise
        msg = f"the dataflow failed: {_first_line(exc)}"
        raise PipelineFailed(msg) from exc
    if not stop.is_set():  # the sources never end by themselves
        msg = "the dataflow ended without being asked to stop"
        raise PipelineFailed(msg)
    if clickhouse is not None:
        # Stopped early: let the migrations finish; a thread inside chDB while the
        # interpreter exits crashes it (SIGSEGV).
        wait([clickhouse])
    logger.info("pipeline stopped; the next start resumes where it stopped")


class PipelineFailed(ServiceError):
    """The dataflow died (a panic in a step, a failed write): the process must not go on
    as if it were running."""


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def stop_on_signals(stop: threading.Event, timeout: float) -> None:
    """SIGINT/SIGTERM set `stop`: every source partition ends, the sink flushes and the run
    returns. A second signal, or a run still going `timeout` seconds after the first (a
    stuck step, a dataflow that panicked and hangs), ends the process with 128 + the
    signal's number; the next start resumes from the last snapshot.

    Call it first, before any thread starts: the signals are blocked in every thread and
    taken by a thread of its own (`sigwait`). A Python handler would run only in the main
    thread, between bytecodes, and the main thread runs Bytewax, which can sit in Rust for
    good; that is how a panicked `keypulse pipeline` once ignored SIGINT and SIGTERM. If even
    Python cannot run (a thread holding the GIL), faulthandler's watchdog (a C thread)
    dumps every thread's stack and exits 1 a few seconds after the timeout.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def take_signals() -> None:
        first = signal.Signals(signal.sigwait(STOP_SIGNALS))
        logger.info("%s: stopping after the current batch (at most %.0f s)", first.name, timeout)
        stop.set()
        faulthandler.dump_traceback_later(timeout + 5, exit=True)
        timer = threading.Timer(timeout, force_exit, args=(
            128 + first, f"still running {timeout:.0f} s after {first.name}: exiting now"))
        timer.daemon = True
        timer.start()
        second = signal.Signals(signal.sigwait(STOP_SIGNALS))
        force_exit(128 + second, f"{second.name} again: exiting now")

    threading.Thread(target=take_signals, name="keypulse-signals", daemon=True).start()


def force_exit(code: int, reason: str) -> NoReturn:
    """End the process now, whatever its threads are doing (Bytewax's workers, Kafka
    clients): one log line, flushed, then `os._exit`."""
    logger.error("pipeline: %s (exit %s)", reason, code)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_line(exc: BaseException) -> str:
    """The root cause in one line: Bytewax wraps a step's exception in its own."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1][:300] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PipelineHealth:
    """Tells a stuck dataflow from a quiet one, from the counters (`/healthz`; cheap).

    Stuck means: a partition handed over no batch for `max_lag_seconds` (an idle source
    ticks every 100 ms, so only a worker that stopped coming back stays silent), none did
    since the start, or a caught-up partition's watermark stood still that long (caught
    up, it advances with wall time). A watermark that lags because the last events were
    old is not stuck: it lags by a constant.
    """

    def __init__(self, max_lag_seconds: float, *, metrics: PipelineMetrics = METRICS,
                 clock: Clock = system_clock) -> None:
        self.max_lag = max_lag_seconds
        self.metrics = metrics
        self.clock = clock
        self.started_at = clock()
        self._marks: dict[int, tuple[int, float]] = {}  # partition → (watermark, since)

    def problem(self) -> str | None:
        """Why the dataflow is stuck, in one line, or None."""
        now = self.clock()
        batch_at = dict(self.metrics.batch_at)
        if not batch_at:
            if now - self.started_at > self.max_lag:
                return f"no batch from Kafka in the {now - self.started_at:.0f} s since start"
            return None
        for partition, at in sorted(batch_at.items()):
            if now - at > self.max_lag:
                return f"partition {partition}: no batch for {now - at:.0f} s"
        caught_up = dict(self.metrics.caught_up)
        for partition, mark in sorted(dict(self.metrics.watermark_ms).items()):
            last = self._marks.get(partition)
            if last is None or last[0] != mark or not caught_up.get(partition) or mark <= 0:
                self._marks[partition] = (mark, now)
            elif now - last[1] > self.max_lag:
                return (f"partition {partition}: caught up, yet its watermark stood still for "
                        f"{now - last[1]:.0f} s")
        return None


class EmbeddedPipeline:
    """The dataflow in a thread of a process that serves other things (`keypulse run`).

    `problem()` says why it is not healthy (the thread died, or the dataflow is stuck);
    the serving process watches `thread` and exits when it ends.
    """

    def __init__(self, settings: Settings, *, epoch_seconds: float = 10.0,
                 migrate: Migrator | None = None, clock: Clock = system_clock) -> None:
        self.settings = settings
        self.migrate = migrate
        self.error: BaseException | None = None
        self.stop_event = threading.Event()  # this run's own
        self.health = PipelineHealth(settings.health_max_lag_seconds, clock=clock)
        self.thread = threading.Thread(target=self._run, args=(epoch_seconds,),
                                       name="keypulse-pipeline", daemon=True)

    def _run(self, epoch_seconds: float) -> None:
        try:
            run_pipeline(self.settings, epoch_seconds=epoch_seconds, handle_signals=False,
                         migrate=self.migrate, stop=self.stop_event)
        except BaseException as exc:
            logger.exception("the pipeline stopped with an error")
            self.error = exc

    def start(self) -> None:
        METRICS.batch_at.clear()  # a previous run's partitions in this process
        METRICS.caught_up.clear()
        self.health = PipelineHealth(self.health.max_lag, clock=self.health.clock)
        self.thread.start()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.thread.join(timeout)

    def problem(self) -> str | None:
        """Why the pipeline is not healthy, in one line, or None."""
        if not self.thread.is_alive():
            if self.error is not None:
                return f"pipeline stopped: {_first_line(self.error)}"
            return "pipeline stopped" if self.thread.ident is not None else "pipeline not started"
        return self.health.problem()

"""Run the dataflow on Kafka and ClickHouse: always with recovery, alone or as a cluster.

Bytewax's Kafka offsets live only in its recovery snapshots, so a run without recovery
would re-read the whole topic; `run_pipeline` therefore always runs with recovery under
`KEYPULSE_DATA_DIR/recovery` (created on first start) and resumes from the last snapshot.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from datetime import timedelta
from types import FrameType
from typing import Any

from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.recovery import RecoveryConfig, init_db_dir

from core import topics
from core.clickhouse import Migrator, prepare
from core.errors import ServiceError
from core.kafka import consumer_config, producer_config
from core.settings import Settings
from pipeline.alerting.hook import AlertingHook
from pipeline.flow import build_flow
from pipeline.kafka_source import STOP, KafkaBatchSource, list_partitions
from pipeline.processor import ProcessorConfig
from pipeline.sinks import OutputSink

logger = logging.getLogger(__name__)


def processor_config(settings: Settings) -> ProcessorConfig:
    return ProcessorConfig(
        window_seconds=settings.window_seconds,
        allowed_lateness_seconds=settings.allowed_lateness_seconds,
        dedup_horizon_seconds=settings.dedup_horizon_seconds,
        dedup_max_ids=settings.dedup_max_ids,
        dedup_dir=settings.data_dir / "dedup",
    )


def kafka_flow(
    settings: Settings,
    *,
    processes: int = 1,
    process_id: int = 0,
    alerts: bool = True,
    migrate: Migrator | None = None,
) -> Dataflow:
    """The production dataflow: Kafka in, ClickHouse and Kafka out. Process 0 applies
    `migrate` (the CLI passes `infra.clickhouse.migrate.migrate`) before its first write."""
    consumer = consumer_config(settings, group_id="keypulse-pipeline")
    events_topic = settings.topic(topics.USAGE_EVENTS)
    partitions = list_partitions(consumer, events_topic)
    source = KafkaBatchSource(consumer, events_topic, partitions=partitions)
    rules_topic = settings.topic(topics.ALERT_RULES)
    rules = KafkaBatchSource(
        consumer, rules_topic, partitions=list_partitions(consumer, rules_topic)
    )
    sink = OutputSink(
        client_factory=lambda: prepare(settings, migrate if process_id == 0 else None).result(),
        producer_config=producer_config(settings),
        topic_name=settings.topic,
        database=settings.clickhouse_database,
        writers=1 if settings.embedded else processes,
        local_writers=[0] if process_id == 0 else [] if settings.embedded else [process_id],
    )
    return build_flow(
        source,
        sink,
        processor_config(settings),
        partitions=partitions,
        rules=rules if alerts else None,
        hook_factory=AlertingHook if alerts else None,
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
) -> None:
    """Run this process's share of the dataflow until SIGINT/SIGTERM (or `STOP` is set).
    Process 0 applies `migrate` to ClickHouse before its first write."""
    from bytewax._bytewax import cli_main

    processes = len(addresses) if addresses else 1
    writes = not process_id or not settings.embedded  # embedded: process 0 alone opens it
    # Opening and migrating ClickHouse overlaps the dataflow's start; the writer waits for it.
    clickhouse = prepare(settings, None if process_id else migrate) if writes else None
    flow = kafka_flow(settings, processes=processes, process_id=process_id or 0, alerts=alerts,
                      migrate=migrate)
    recovery = recovery_config(settings, max(processes, 1), create=not process_id)
    if handle_signals:
        _stop_on_signals()
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
            raise
    logger.info("pipeline stopped; the next start resumes where it stopped")


def _stop_on_signals() -> None:
    """SIGINT/SIGTERM end every source partition; the sink flushes and the run returns.

    A second signal interrupts at once (the next start resumes from the last snapshot).
    """

    def handler(signum: int, _frame: FrameType | None) -> Any:
        if STOP.is_set():
            raise KeyboardInterrupt
        logger.info("%s: stopping after the current batch", signal.Signals(signum).name)
        STOP.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class EmbeddedPipeline:
    """The dataflow in a thread of a process that serves other things (`keypulse run`)."""

    def __init__(self, settings: Settings, *, epoch_seconds: float = 10.0,
                 migrate: Migrator | None = None) -> None:
        self.settings = settings
        self.migrate = migrate
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(epoch_seconds,),
                                       name="keypulse-pipeline", daemon=True)

    def _run(self, epoch_seconds: float) -> None:
        try:
            run_pipeline(self.settings, epoch_seconds=epoch_seconds, handle_signals=False,
                         migrate=self.migrate)
        except BaseException as exc:
            logger.exception("the pipeline stopped with an error")
            self.error = exc

    def start(self) -> None:
        STOP.clear()
        self.thread.start()

    def stop(self, timeout: float = 30) -> None:
        STOP.set()
        self.thread.join(timeout)

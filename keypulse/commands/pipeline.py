"""`keypulse pipeline`: the Bytewax dataflow alone; several processes form one cluster.

It always stops: SIGTERM/SIGINT end the run after the current batch; a second signal, or a
run still going `--stop-timeout` seconds later (a stuck step), exits at once with 128 + the
signal's number. A run that fails logs why in one line and exits 1 at once: the threads a
dead dataflow leaves (Bytewax's, chDB's) can hang or crash the interpreter's normal exit.

Each process serves `/healthz`, `/readyz` and `/metrics` on `KEYPULSE_PIPELINE_HTTP_PORT` + its
process id (0: not served), on a small threaded server of its own, off the dataflow's thread.
A port already taken is logged and the dataflow runs without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import TYPE_CHECKING

from core.errors import ConfigError, KeypulseError, ServiceError
from core.settings import Settings

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from core.telemetry import HttpServer

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p",
        "--processes",
        type=int,
        default=1,
        help="start this many local processes as one cluster (default 1)",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=2101,
        help="first port of the local cluster's addresses (with -p)",
    )
    parser.add_argument(
        "--addresses",
        help="host:port of every process of a cluster, "
        "comma-separated, the same list and order on every process",
    )
    parser.add_argument(
        "-i", "--process-id", type=int, help="this process's index in --addresses (from 0)"
    )
    parser.add_argument(
        "--epoch-seconds",
        type=float,
        default=10.0,
        help="snapshot interval (Bytewax's default): at most this much is replayed after a crash",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds a stopping run may take before the process exits anyway (default 30)",
    )
    parser.add_argument(
        "--no-alerts",
        action="store_true",
        help="skip alert evaluation (benchmarks measure its cost this way)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.processes > 1 and not args.addresses:
        extra = ["--log-level", args.log_level] if args.log_level else []
        pipeline_args = ["--epoch-seconds", str(args.epoch_seconds),
                         "--stop-timeout", str(args.stop_timeout)]
        if args.no_alerts:
            pipeline_args.append("--no-alerts")
        return spawn_local_cluster(args.processes, args.base_port, extra, pipeline_args)
    addresses = None
    if args.addresses:
        addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
        if args.process_id is None or not 0 <= args.process_id < len(addresses):
            msg = f"--process-id must be in [0, {len(addresses)}) with --addresses"
            raise ConfigError(msg)
    import threading

    from pipeline.runner import force_exit, run_pipeline, stop_on_signals

    stop = threading.Event()
    stop_on_signals(stop, args.stop_timeout)  # first: every thread started later inherits it
    from infra.clickhouse.migrate import migrate

    if not args.process_id:
        from core.clickhouse import prepare

        prepare(settings, migrate)  # opens and migrates ClickHouse while the dataflow loads
    http = serve_telemetry(settings, args.process_id if addresses else 0)
    try:
        run_pipeline(
            settings,
            process_id=args.process_id if addresses else None,
            addresses=addresses,
            epoch_seconds=args.epoch_seconds,
            alerts=not args.no_alerts,
            migrate=migrate,
            stop=stop,
            handle_signals=False,
        )
    except KeypulseError as exc:
        force_exit(1, str(exc))
    except Exception:
        logger.exception("the pipeline failed")
        force_exit(1, "the pipeline failed")
    if http is not None:
        http.__exit__()
    return 0


def serve_telemetry(settings: Settings, process_id: int) -> HttpServer | None:
    """`/healthz` (the dataflow stuck), `/readyz` (also Kafka, and ClickHouse where this
    process writes) and `/metrics` on this process's port, or None (port 0, or taken)."""
    from core.clickhouse import prepare
    from core.telemetry import (
        Check,
        Endpoints,
        HttpServer,
        Telemetry,
        clickhouse_probe,
        kafka_probe,
    )
    from pipeline.runner import PipelineHealth

    if not settings.pipeline_http_port:
        return None
    port = settings.pipeline_http_port + process_id
    readiness: list[Check] = [kafka_probe(settings)]
    if not process_id or not settings.embedded:  # this process opens ClickHouse

        def clickhouse() -> Client:
            opening = prepare(settings)  # the run's own: opened (and migrated) once
            if not opening.done():
                msg = "opening (and migrating) the store"
                raise ServiceError(msg)
            return opening.result()

        readiness.append(clickhouse_probe(clickhouse))
    health = PipelineHealth(settings.health_max_lag_seconds)
    endpoints = Endpoints(Telemetry(readiness=readiness), health=[health.problem])
    try:
        server = HttpServer(endpoints, settings.host, port)
    except ServiceError as exc:
        failure = str(exc)
    else:
        logger.info("pipeline: /healthz, /readyz and /metrics on http://%s:%s",
                    settings.host, port)
        return server.__enter__()
    logger.error("%s; the pipeline runs without them (KEYPULSE_PIPELINE_HTTP_PORT, 0 = off)",
                 failure)
    return None


def spawn_local_cluster(
    processes: int, base_port: int, argv_extra: list[str], pipeline_args: list[str]
) -> int:
    """Start `processes` pipeline processes on this machine as one Bytewax cluster."""
    addresses = ",".join(f"127.0.0.1:{base_port + i}" for i in range(processes))
    children: list[subprocess.Popen[bytes]] = []
    for i in range(processes):
        cmd = [
            sys.executable,
            "-m",
            "keypulse.cli",
            *argv_extra,
            "pipeline",
            "--addresses",
            addresses,
            "--process-id",
            str(i),
            *pipeline_args,
        ]
        children.append(subprocess.Popen(cmd, env=os.environ.copy()))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


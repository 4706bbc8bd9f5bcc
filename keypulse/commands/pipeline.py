"""`keypulse pipeline`: the Bytewax dataflow alone; several processes form one cluster."""

from __future__ import annotations

import argparse

from keypulse.errors import ConfigError
from keypulse.settings import Settings


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
        "--no-alerts",
        action="store_true",
        help="skip alert evaluation (benchmarks measure its cost this way)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.processes <= 1 and not args.process_id:
        from keypulse.clickhouse import prepare

        prepare(settings)  # opens and migrates ClickHouse while the dataflow loads
    from pipeline.runner import run_pipeline, spawn_local_cluster

    if args.addresses:
        addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
        if args.process_id is None or not 0 <= args.process_id < len(addresses):
            msg = f"--process-id must be in [0, {len(addresses)}) with --addresses"
            raise ConfigError(msg)
        run_pipeline(
            settings,
            process_id=args.process_id,
            addresses=addresses,
            epoch_seconds=args.epoch_seconds,
            alerts=not args.no_alerts,
        )
        return 0
    if args.processes > 1:
        extra = ["--log-level", args.log_level] if args.log_level else []
        pipeline_args = ["--epoch-seconds", str(args.epoch_seconds)]
        if args.no_alerts:
            pipeline_args.append("--no-alerts")
        return spawn_local_cluster(args.processes, args.base_port, extra, pipeline_args)
    run_pipeline(settings, epoch_seconds=args.epoch_seconds, alerts=not args.no_alerts)
    return 0

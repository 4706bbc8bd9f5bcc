"""`keypulse kafka start|stop|status`: the local single-node Kafka (DESIGN §6)."""

from __future__ import annotations

import argparse
import sys

from core.settings import Settings
from infra.kafka import launcher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("start", "stop", "status"),
        help=(
            "start: fetch the jars with Maven (first time only), launch a broker+controller "
            "in the background at KEYPULSE_KAFKA_BOOTSTRAP and create the topics; "
            "stop: stop that broker (SIGTERM, SIGKILL after --timeout); "
            "status: pid, bootstrap, controller port, data dir and topic count"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start: how long to wait for the broker to answer (default 60); "
        "stop: how long to wait for a clean exit before SIGKILL (default 30)",
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "start":
        message = launcher.start(settings, wait_seconds=args.timeout or 60, progress=_progress)
    elif args.action == "stop":
        message = launcher.stop(settings, timeout=args.timeout or 30)
    else:
        message = launcher.status(settings)
    print(message)
    return 0

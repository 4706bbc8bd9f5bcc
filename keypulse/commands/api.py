"""`keypulse api [--host H] [--port P]`: the HTTP API alone.

It opens ClickHouse before it serves: an embedded store (chDB) admits one process, so
pointed at one that `keypulse run` or a pipeline holds, it says so in one line and exits 1.
"""

from __future__ import annotations

import argparse
import fcntl
from pathlib import Path
from urllib.parse import urlparse

from core.errors import ServiceError
from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to bind (default: KEYPULSE_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default: KEYPULSE_PORT)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from api import create_app
    from core.clickhouse import shared_client
    from core.telemetry import Telemetry, clickhouse_probe, kafka_probe
    from keypulse.server import check_bind, serve

    host = args.host or settings.host
    check_bind(settings, host)  # before opening anything
    try:
        shared_client(settings)
    except ServiceError:
        if settings.embedded and held(Path(urlparse(settings.dsn).path)):
            msg = (f"the embedded store {settings.dsn} is held by another process (keypulse "
                   "run or pipeline): embedded, one process serves it all; use `keypulse run`, "
                   "or a ClickHouse server (KEYPULSE_CLICKHOUSE_DSN=http://...)")
            raise ServiceError(msg) from None
        raise
    # /readyz: the broker the API publishes to, and the store it reads
    telemetry = Telemetry(readiness=[kafka_probe(settings),
                                     clickhouse_probe(lambda: shared_client(settings))])
    return serve(create_app(settings, telemetry=telemetry), settings, host=host,
                 port=args.port or settings.port)


def held(store: Path) -> bool:
    """Whether another process holds the embedded store (ClickHouse flocks its `status`)."""
    try:
        with (store / "status").open("rb") as status:
            try:
                fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(status, fcntl.LOCK_UN)
    except FileNotFoundError:
        pass
    return False

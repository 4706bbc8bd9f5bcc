"""`keypulse ws [--host H] [--port P]`: the WebSocket bridge alone (Kafka only, no ClickHouse).

Beside `/ws` it answers `/healthz`, `/readyz` (Kafka answers) and `/metrics`.

uvicorn handles SIGINT/SIGTERM: it closes the sockets and runs the app's lifespan exit,
which stops the bridge's Kafka threads.
"""

from __future__ import annotations

import argparse
import sys

from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to bind (default: KEYPULSE_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default: KEYPULSE_PORT)")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from core.telemetry import Telemetry, kafka_probe
    from keypulse.server import check_bind, serve
    from ws_bridge import UVICORN_WS_OPTIONS, create_bridge

    host = args.host or settings.host
    check_bind(settings, host)
    # The Kafka thread and the event loop share the GIL: while the loop writes a broadcast
    # to 10,000 sockets, the default 5 ms switch interval is what a freshly fetched
    # per-user message waits, several times per batch. 1 ms keeps that wait small.
    sys.setswitchinterval(0.001)
    bridge = create_bridge(settings, telemetry=Telemetry(readiness=[kafka_probe(settings)]))
    return serve(
        bridge.app(),
        settings,
        host=host,
        port=args.port or settings.port,
        access_log=False,
        backlog=args.backlog,
        loop="uvloop",  # installed with uvicorn[standard]; "auto" would fall back silently
        lifespan="on",
        **UVICORN_WS_OPTIONS,
    )

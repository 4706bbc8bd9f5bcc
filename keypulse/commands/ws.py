"""`keypulse ws [--host H] [--port P]`: the WebSocket bridge alone (Kafka only, no ClickHouse).

Beside `/ws` it answers `/healthz`, `/readyz` (Kafka answers) and `/metrics`.

uvicorn handles SIGINT/SIGTERM: it closes the sockets and runs the app's lifespan exit,
which stops the bridge's Kafka threads.
"""

from __future__ import annotations

import argparse
import gc
import sys

from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to bind (default: KEYPULSE_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default: KEYPULSE_PORT)")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog")


def gc_for_many_sockets() -> None:
    """The collector's policy for a bridge. Its objects live long (sockets, their queues, the
    live tier's windows) and it allocates fast: with the default thresholds a full collection
    ran every few seconds at 10,000 sockets, each stopping the loop for 0.1–1.5 s and freeing
    nothing (measured under bench/ws.py's live load), the main cause of late frames. What is
    loaded at start is frozen (it lives as long as the process); young objects are collected
    every 100,000 allocations, and a full collection is rare (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


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
    gc_for_many_sockets()
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

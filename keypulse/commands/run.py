"""`keypulse run`: the embedded default. Pipeline, HTTP API and WebSocket bridge in one
process on one port, on one embedded ClickHouse (chDB).

Death is loud: when the pipeline's thread ends, the server stops and the process exits 1
with one log line saying why (a supervisor restarts it; the pipeline resumes from its last
snapshot), and `/healthz` answers 503 while the pipeline is dead or stuck; `/readyz` also
while Kafka or ClickHouse does not answer.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from core.errors import ServiceError
from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to bind (default: KEYPULSE_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default: KEYPULSE_PORT)")
    parser.add_argument("--epoch-seconds", type=float, default=10.0,
                        help="pipeline snapshot interval")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from api import create_app
    from core.clickhouse import prepare, redact, shared_client
    from core.telemetry import Telemetry, clickhouse_probe, kafka_probe
    from infra.clickhouse.migrate import migrate
    from infra.kafka.launcher import is_up
    from keypulse.server import check_bind, serve
    from pipeline.runner import EmbeddedPipeline
    from ws_bridge import UVICORN_WS_OPTIONS, create_bridge

    host, port = args.host or settings.host, args.port or settings.port
    check_bind(settings, host)
    if not is_up(settings):
        msg = (f"Kafka does not answer at {settings.kafka_bootstrap}; "
               "start it with `keypulse kafka start`")
        raise ServiceError(msg)
    prepare(settings, migrate).result()  # opened and migrated once; the pipeline reuses it
    pipeline = EmbeddedPipeline(settings, epoch_seconds=args.epoch_seconds, migrate=migrate)
    telemetry = Telemetry(readiness=[kafka_probe(settings),
                                     clickhouse_probe(lambda: shared_client(settings))])
    bridge = create_bridge(settings, telemetry=telemetry)

    @contextlib.asynccontextmanager
    async def pipeline_lifespan(_app: Any) -> AsyncIterator[None]:
        pipeline.start()
        try:
            yield
        finally:
            pipeline.stop()

    def pipeline_died() -> str | None:
        if pipeline.thread.is_alive() or pipeline.stop_event.is_set():
            return None
        return pipeline.problem()

    app = create_app(settings, routers=[bridge.router],
                     lifespans=[pipeline_lifespan, bridge.lifespan],
                     health_checks=[pipeline.problem], telemetry=telemetry)
    base = f"http://{host}:{port}"
    print(f"keypulse: dashboard {base}/  health {base}/healthz  readiness {base}/readyz  "
          f"metrics {base}/metrics  WebSocket ws://{host}:{port}/ws  "
          f"ClickHouse {redact(settings.dsn)}", flush=True)
    code = serve(app, settings, host=host, port=port, access_log=False, watch=pipeline_died,
                 **UVICORN_WS_OPTIONS)
    return 1 if code or pipeline.error is not None else 0

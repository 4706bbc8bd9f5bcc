"""`keypulse api [--host H] [--port P]`: the HTTP API alone."""

from __future__ import annotations

import argparse

from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="interface to bind (default: KEYPULSE_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default: KEYPULSE_PORT)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api import create_app

    uvicorn.run(create_app(settings), host=args.host or settings.host,
                port=args.port or settings.port, log_level=settings.log_level.lower())
    return 0

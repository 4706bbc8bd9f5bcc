"""`keypulse sql "SELECT ..." [--format F] [--database D]`: read-only SQL on the store.

It asks the running `keypulse run` / `keypulse api` at KEYPULSE_HOST:KEYPULSE_PORT
(`/clickhouse/`, with a one-minute analyst token minted with the configured secret). When
nothing answers there it opens the store itself with the same read-only settings; an embedded
store that another process holds without serving it here is reported in one line.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode, urlparse

from core.errors import ServiceError
from core.settings import Settings

TOKEN_TTL_SECONDS = 60
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="the SQL (read-only: SELECT, SHOW, DESCRIBE, EXPLAIN...)")
    parser.add_argument("--format", default="TabSeparated",
                        help="a ClickHouse output format (default TabSeparated)")
    parser.add_argument("--database", default=None,
                        help="the current database (default: KEYPULSE_CLICKHOUSE_DATABASE)")
    parser.add_argument("--host", default=None, help="the API's host (default: KEYPULSE_HOST)")
    parser.add_argument("--port", type=int, default=None, help="its port (default: KEYPULSE_PORT)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    database = args.database or settings.clickhouse_database
    answer = _ask_server(args, settings, database)
    if answer is None:
        answer = _ask_store(args, settings, database)
    sys.stdout.buffer.write(answer)
    sys.stdout.flush()
    return 0


def _ask_server(args: argparse.Namespace, settings: Settings, database: str) -> bytes | None:
    """The endpoint's answer; None when nothing listens there."""
    from core.auth import mint_token

    host = args.host or settings.host
    host = WILDCARDS.get(host, host)
    port = args.port or settings.port
    if ":" in host:
        host = f"[{host}]"
    token = mint_token(settings, "keypulse-sql", roles=("analyst",),
                       ttl_seconds=TOKEN_TTL_SECONDS)
    query = urlencode({"database": database, "default_format": args.format})
    request = urllib.request.Request(
        f"http://{host}:{port}/clickhouse/?{query}", data=args.query.encode(), method="POST",
        headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=settings.sql_max_seconds + 30) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        msg = f"{exc.code} from {host}:{port}: {text.splitlines()[0] if text else exc.reason}"
        raise ServiceError(msg) from None
    except (urllib.error.URLError, ConnectionError):
        return None


def _ask_store(args: argparse.Namespace, settings: Settings, database: str) -> bytes:
    from api.sql import ReadOnlyStore
    from keypulse.commands.api import held

    if settings.embedded and held(Path(urlparse(settings.dsn).path)):
        port = args.port or settings.port
        msg = (f"the embedded store {settings.dsn} is held by another process and nothing "
               f"answers SQL on port {port}: point --host/--port at its `keypulse run`/`api`")
        raise ServiceError(msg)
    store = ReadOnlyStore.open(settings)
    try:
        return store.run(args.query, database, args.format)
    finally:
        store.close()

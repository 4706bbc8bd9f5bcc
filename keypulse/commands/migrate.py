"""`keypulse migrate`: create or upgrade the ClickHouse schema at the DSN."""

from __future__ import annotations

import argparse

from core.clickhouse import connect, redact
from core.settings import Settings
from infra.clickhouse.migrate import ensure_analyst, migrate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn", help="ClickHouse DSN (default: KEYPULSE_CLICKHOUSE_DSN or embedded)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    dsn = args.dsn or settings.dsn
    client = connect(dsn)
    applied = migrate(client, settings, progress=lambda line: print(f"  {line}", flush=True))
    ensure_analyst(client, settings, progress=lambda line: print(f"  {line}", flush=True))
    where = redact(dsn)
    if applied:
        print(f"migrated {where}: applied {', '.join(applied)}")
    else:
        print(f"{where} is up to date")
    return 0

"""The one factory for ClickHouse clients: embedded chDB (`chdb:///path`) or a server (`http://`).

Only one process may open an embedded path, so a process opens it once and shares the
client (`shared_client`). Every query names the database explicitly.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from core.errors import ServiceError
from core.settings import Settings

Migrator = Callable[[Client, Settings], object]  # infra.clickhouse.migrate.migrate, passed in

_lock = threading.Lock()
_shared: dict[str, Client] = {}
_ready: dict[str, Future[Client]] = {}


def connect(dsn: str) -> Client:
    """Open a client for a DSN; ServiceError with one clear line when it cannot."""
    try:
        if dsn.startswith("chdb://"):
            path = Path(urlparse(dsn).path or dsn.removeprefix("chdb://"))
            path.mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=f"chdb://{path}")
        client = clickhouse_connect.get_client(dsn=dsn, connect_timeout=5, send_receive_timeout=60)
        client.command("SELECT 1")
        return client
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        msg = f"cannot reach ClickHouse at {redact(dsn)}: {_first_line(exc)}"
        raise ServiceError(msg) from None


def shared_client(settings: Settings) -> Client:
    """One client per DSN per process (required for embedded chDB)."""
    dsn = settings.dsn
    with _lock:
        client = _shared.get(dsn)
        if client is None:
            client = connect(dsn)
            _shared[dsn] = client
        return client


def prepare(settings: Settings, migrate: Migrator | None = None) -> Future[Client]:
    """The shared client, opened (and migrated by `migrate`, if given) in a background thread.

    A cold start overlaps this — loading the engine, its first queries, the migrations —
    with importing and starting the dataflow; whoever writes waits on the future. The
    migrations come from the caller (the CLI passes `infra.clickhouse.migrate.migrate`): the
    foundation never imports a floor above it.
    """
    with _lock:
        future = _ready.get(settings.dsn)
        if future is not None:
            return future
        future = _ready[settings.dsn] = Future()

    def work() -> None:
        try:
            client = shared_client(settings)
            if migrate is not None:
                migrate(client, settings)
            future.set_result(client)
        except BaseException as exc:  # handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=work, name="keypulse-clickhouse", daemon=True).start()
    return future


def redact(dsn: str) -> str:
    parsed = urlparse(dsn)
    if parsed.password:
        return dsn.replace(f":{parsed.password}@", ":***@")
    return dsn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if errno := re.search(r"\[Errno -?\d+\] ([^\"')]+)", text):
        return errno.group(1).strip()
    return text.splitlines()[0][:300]

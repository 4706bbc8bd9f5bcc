"""The one factory for ClickHouse clients: embedded chDB (`chdb:///path`) or a server (`http://`).

Only one process may open an embedded path, so a process opens it once and shares the
client (`shared_client`). Every query names the database explicitly.

A server client (docs/clickhouse.md) compresses both directions with LZ4 (a DSN's own
`?compress=` wins), is opened without a session database (the DSN's path names a database
that `keypulse migrate` may still have to create, and every query names its database anyway),
and sends `SERVER_SETTINGS` with every request, those of them the server knows.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from core.errors import ServiceError
from core.settings import Settings

Migrator = Callable[[Client, Settings], object]  # infra.clickhouse.migrate.migrate, passed in

# Sent with every request to a server (never to chDB, whose behaviour stays as it was):
# - async_insert=0: the pipeline batches its inserts itself and takes an insert's success to
#   mean "stored" before it snapshots its Kafka offsets; a server-side buffer (the default of
#   recent servers) would add its flush delay to every batch, and with wait_for_async_insert=0
#   in a profile an acknowledged batch could be lost.
# - insert_deduplicate=1 and deduplicate_insert=enable (the newer setting, which supersedes the
#   first): a retried insert of the same bytes into a Replicated* table (the cluster path) is
#   stored once. Plain MergeTree tables keep no deduplication log; correctness never rests on
#   it (every table is a ReplacingMergeTree keyed by the row's identity, read FINAL).
SERVER_SETTINGS: dict[str, str | int] = {
    "async_insert": 0,
    "insert_deduplicate": 1,
    "deduplicate_insert": "enable",
}
SERVER_COMPRESSION = "lz4"

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
        client = clickhouse_connect.get_client(
            dsn=server_dsn(dsn),
            compress=SERVER_COMPRESSION,
            connect_timeout=5,
            send_receive_timeout=60,
        )
        for name, value in server_settings(set(client.server_settings)).items():
            client.set_client_setting(name, value)
        client.command("SELECT 1")
        return client
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        msg = f"cannot reach ClickHouse at {redact(dsn)}: {_first_line(exc)}"
        raise ServiceError(msg) from None


def server_dsn(dsn: str) -> str:
    """A server DSN without its database path: the client then has no session database, so it
    connects before `keypulse migrate` has created that database."""
    return urlunparse(urlparse(dsn)._replace(path=""))


def server_settings(known: set[str]) -> dict[str, str | int]:
    """`SERVER_SETTINGS` that a server knowing the settings `known` accepts: an older server
    refuses every request that names a setting it does not have."""
    return {name: value for name, value in SERVER_SETTINGS.items() if name in known}


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

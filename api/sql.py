"""Read-only SQL on the store for analysts (`/clickhouse/`, `keypulse sql`).

The guard is the engine's own `readonly=1`, never a parse of the SQL: with it ClickHouse
refuses DDL, INSERT, any change of a setting (`SET`, a `SETTINGS` clause) and the table
functions that reach the host or the network (`file()`, `url()`, `s3()`, `remote()`...).
ClickHouse refuses every setting that comes after `readonly=1`, so the limits
(`max_execution_time`, `max_result_rows`, `max_result_bytes`) are applied before it.

Embedded, the queries run on a handle of their own: clickhouse-connect's chDB backend applies
per-call settings with `SET` and restores them afterwards, and a restore is itself refused
once `readonly=1` is set, which would leave the process's shared (writing) client read-only.
So the dedicated handle gets the limits and then `readonly=1` once, for its whole life; the
shared client is never touched. With a server DSN the same settings ride on each request.

    ReadOnlyStore.open(settings)   the dedicated client, limits applied, read-only
    store.run(query, database, fmt) -> bytes   the answer in `fmt`; SQLError when refused
    limits(settings)               the ordered settings (readonly last)
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

from core.clickhouse import connect
from core.errors import KeypulseError

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from core.settings import Settings

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a database or format name
_CODE = re.compile(r"Code: (\d+)\. (DB::Exception: .*)", re.DOTALL)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*$", re.IGNORECASE)
# ClickHouse's HTTP statuses for the codes an analyst meets; any other refusal is a 400.
_STATUS = {164: 403, 497: 403, 60: 404, 81: 404, 159: 400, 396: 400, 62: 400}


class SQLError(KeypulseError):
    """ClickHouse refused the query: its code, its `DB::Exception: ...` text, an HTTP status."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.status = _STATUS.get(code, 400)


def limits(settings: Settings) -> dict[str, str]:
    """The per-query settings, in the order they must be applied: `readonly` last."""
    return {
        "max_execution_time": str(settings.sql_max_seconds),
        "max_result_rows": str(settings.sql_max_result_rows),
        "max_result_bytes": str(settings.sql_max_result_bytes),
        "result_overflow_mode": "throw",
        "readonly": "1",
    }


def answer_format(query: str, fmt: str) -> str:
    """The format ClickHouse answers in: the query's own FORMAT clause wins over `fmt`."""
    match = _TRAILING_FORMAT.search(query)
    return match.group(1) if match else fmt


def clean(query: str) -> str:
    """The query without trailing blanks and semicolons (a FORMAT clause is appended)."""
    return query.strip().rstrip(";").rstrip()


class ReadOnlyStore:
    """A client that can only read, with the configured limits; one query at a time."""

    def __init__(self, client: Client, settings: Settings, *, per_query: bool) -> None:
        self._client = client
        self._settings = limits(settings) if per_query else None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings) -> ReadOnlyStore:
        """A new client on `settings.dsn`: embedded, a second handle on the process's engine
        (the shared client must be open already), made read-only for good."""
        client = connect(settings.dsn)
        if not settings.embedded:
            return cls(client, settings, per_query=True)
        for name, value in limits(settings).items():
            client.command(f"SET {name} = '{value}'")
        return cls(client, settings, per_query=False)

    def run(self, query: str, database: str, fmt: str) -> bytes:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        query = clean(query)
        if not query:
            raise SQLError(62, "DB::Exception: Empty query. (SYNTAX_ERROR)")
        suffix = None if _TRAILING_FORMAT.search(query) else fmt
        with self._lock:
            self._client.database = database
            try:
                return self._client.raw_query(query, settings=self._settings, fmt=suffix)
            except ClickHouseError as exc:
                raise _sql_error(exc) from None

    def close(self) -> None:
        self._client.close()


def _sql_error(exc: Exception) -> SQLError:
    text = str(exc)
    match = _CODE.search(text)
    if match is None:
        return SQLError(1002, f"DB::Exception: {text.strip().splitlines()[0][:500]}")
    body = match.group(2).strip()
    body = re.sub(r"^DB::Exception: Code: \d+\. ", "", body)  # chDB nests the prefix
    return SQLError(int(match.group(1)), body)

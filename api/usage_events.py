"""A user's raw usage events and usage reports: the newest-first list and the streamed export
(DESIGN §8, `GET /v1/usage/events` and `GET /v1/usage/export`).

    EventFilter                    the owner (from the token), a `[from, to)` range, a service
                                   and a status class
    events_page(client, db, f, limit, before)
                                   one page, newest first, keyset on (ts, event_id) below
                                   `before`: (rows, the next page's position or None)
    event_chunks / rollup_chunks   the whole range in time order, in bounded chunks: each chunk
                                   is one keyset query of at most CHUNK_ROWS rows, an Arrow table
    csv_stream / parquet_stream    bytes written as the chunks come (Arrow's writers): CSV rows
                                   under one header, parquet one row group per chunk

Every read is `FINAL`: a replayed event or a recomputed rollup replaces its twin, so a row is
listed once. Every query leads with `user_id` (the tables' primary key prefix) and takes its
values as server-side parameters. Keyset positions make the list stable under inserts: a page
starts strictly below the last row of the previous one, so events written since never shift
or repeat what follows. An export never holds more than one chunk: the store returns a chunk,
it is written out, and the writer's buffer is drained before the next query.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from clickhouse_connect.driver.client import Client

from api.params import iso
from core import sketch

CHUNK_ROWS = 10_000  # rows per export query, row group and write: the export's memory bound

Row = Sequence[Any]
Position = tuple[int, str]  # an event's (ts_ms, event_id): the keyset


class StatusClass(enum.StrEnum):
    """`status_code // 100` as the breakdowns name it."""

    INFORMATIONAL = "1xx"
    SUCCESS = "2xx"
    REDIRECT = "3xx"
    CLIENT_ERROR = "4xx"
    SERVER_ERROR = "5xx"

    @property
    def hundreds(self) -> int:
        return int(self.value[0])


class ExportData(enum.StrEnum):
    """What an export holds: raw events, or the hourly or daily rollups."""

    EVENTS = "events"
    HOURLY = "hourly"
    DAILY = "daily"


class ExportFormat(enum.StrEnum):
    CSV = "csv"
    PARQUET = "parquet"

    @property
    def media_type(self) -> str:
        return {"csv": "text/csv; charset=utf-8",
                "parquet": "application/vnd.apache.parquet"}[self.value]


class EventItem(msgspec.Struct, frozen=True):
    """A stored usage event: its contract fields (DESIGN §1), `ts` as RFC 3339 UTC, an absent
    optional field as null, and `late` (it arrived after its window closed)."""

    event_id: str
    ts: str
    user_id: str
    api_key_id: str
    service: str
    status_code: int
    latency_ms: float
    endpoint: str | None
    method: str | None
    tokens_in: int | None
    tokens_out: int | None
    cost_usd: float | None
    request_bytes: int | None
    response_bytes: int | None
    error_type: str | None
    region: str | None
    sdk: str | None
    schema_version: int
    late: bool


class EventPage(msgspec.Struct, frozen=True):
    items: list[EventItem]
    next_cursor: str | None


@dataclass(frozen=True)
class EventFilter:
    user_id: str
    from_ms: int
    to_ms: int
    service: str | None = None
    status_class: StatusClass | None = None

    def where(self, time_column: str) -> tuple[str, dict[str, Any]]:
        """The WHERE clause (user first: the primary key's prefix) and its parameters."""
        clauses = [
            "user_id = {user_id:String}",
            f"{time_column} >= fromUnixTimestamp64Milli({{from_ms:Int64}}, 'UTC')",
            f"{time_column} < fromUnixTimestamp64Milli({{to_ms:Int64}}, 'UTC')",
        ]
        params: dict[str, Any] = {"user_id": self.user_id, "from_ms": self.from_ms,
                                  "to_ms": self.to_ms}
        if self.service is not None:
            clauses.append("service = {service:String}")
            params["service"] = self.service
        if self.status_class is not None:
            clauses.append("intDiv(status_code, 100) = {hundreds:UInt16}")
            params["hundreds"] = self.status_class.hundreds
        return " AND ".join(clauses), params


# ---- columns --------------------------------------------------------------------------------

TIME = pa.timestamp("ms", tz="UTC")


@dataclass(frozen=True)
class Column:
    """One column of an export: its name, its parquet type, and the SQL that reads it (a time
    as epoch milliseconds)."""

    name: str
    arrow: pa.DataType
    sql: str = ""

    @property
    def select(self) -> str:
        return self.sql or self.name


def _optional(name: str) -> Column:
    """An optional string field: stored as '' when absent, answered as null."""
    return Column(name, pa.string(), f"nullIf(toString({name}), '')")


EVENT_COLUMNS: tuple[Column, ...] = (
    Column("event_id", pa.string()),
    Column("ts", TIME, "toUnixTimestamp64Milli(ts)"),
    Column("user_id", pa.string()),
    Column("api_key_id", pa.string()),
    Column("service", pa.string(), "toString(service)"),
    Column("status_code", pa.int32()),
    Column("latency_ms", pa.float64()),
    _optional("endpoint"),
    _optional("method"),
    Column("tokens_in", pa.int64()),
    Column("tokens_out", pa.int64()),
    Column("cost_usd", pa.float64()),
    Column("request_bytes", pa.int64()),
    Column("response_bytes", pa.int64()),
    _optional("error_type"),
    _optional("region"),
    _optional("sdk"),
    Column("schema_version", pa.int32()),
    Column("late", pa.bool_()),
)
_EVENT_SELECT = ", ".join(column.select for column in EVENT_COLUMNS)

# A rollup row as exported: its bucket and service, then the stats record's figures (DESIGN §2)
# over the bucket, percentiles read from the bucket's merged latency sketch.
ROLLUP_COLUMNS: tuple[Column, ...] = (
    Column("bucket_start", TIME),
    Column("service", pa.string()),
    Column("requests", pa.int64()),
    Column("successes", pa.int64()),
    Column("client_errors", pa.int64()),
    Column("server_errors", pa.int64()),
    Column("success_rate", pa.float64()),
    Column("error_rate", pa.float64()),
    Column("server_error_rate", pa.float64()),
    Column("latency_avg_ms", pa.float64()),
    Column("latency_p50_ms", pa.float64()),
    Column("latency_p95_ms", pa.float64()),
    Column("latency_p99_ms", pa.float64()),
    Column("latency_max_ms", pa.float64()),
    Column("tokens_in", pa.int64()),
    Column("tokens_out", pa.int64()),
    Column("cost_usd", pa.float64()),
)
_ROLLUP_SELECT = (
    "toUnixTimestamp(bucket_start) * 1000, toString(service), requests, successes, "
    "client_errors, server_errors, latency_sum_ms, latency_max_ms, latency_bins, "
    "latency_bin_counts, tokens_in, tokens_out, cost_usd"
)
ROLLUP_TABLES = {ExportData.HOURLY: "usage_rollup_1h", ExportData.DAILY: "usage_rollup_1d"}


def event_item(row: Row) -> EventItem:
    """A row of `EVENT_COLUMNS` as the list answers it."""
    return EventItem(row[0], iso(row[1]), *row[2:])


def rollup_row(row: Row) -> Row:
    """A rollup row as read (`_ROLLUP_SELECT`) → a row of `ROLLUP_COLUMNS`."""
    (bucket_ms, service, requests, successes, client_errors, server_errors, latency_sum,
     latency_max, bins, bin_counts, tokens_in, tokens_out, cost) = row
    rates: tuple[float | None, ...] = (None, None, None, None)
    if requests:
        rates = (successes / requests, (client_errors + server_errors) / requests,
                 server_errors / requests, latency_sum / requests)
    quantiles = tuple(sketch.quantile(bins, bin_counts, q, latency_max) for q in (.5, .95, .99))
    return (bucket_ms, service, requests, successes, client_errors, server_errors, *rates,
            *quantiles, latency_max if requests else None, tokens_in, tokens_out, cost)


# ---- queries --------------------------------------------------------------------------------


def _events_query(database: str, found: EventFilter, limit: int, after: Position | None, *,
                  newest_first: bool) -> tuple[str, dict[str, Any]]:
    """At most `limit` events strictly past `after` in the order asked."""
    where, params = found.where("ts")
    if after is not None:
        beyond = "<" if newest_first else ">"
        where += (
            f" AND ts {beyond}= fromUnixTimestamp64Milli({{after_ms:Int64}}, 'UTC')"
            f" AND (ts {beyond} fromUnixTimestamp64Milli({{after_ms:Int64}}, 'UTC')"
            f" OR event_id {beyond} {{after_id:String}})"
        )
        params["after_ms"], params["after_id"] = after
    order = "DESC" if newest_first else "ASC"
    params["limit"] = limit
    sql = (f"SELECT {_EVENT_SELECT} FROM {database}.usage_events FINAL WHERE {where} "
           f"ORDER BY ts {order}, event_id {order} LIMIT {{limit:UInt32}}")
    return sql, params


def events_page(client: Client, database: str, found: EventFilter, limit: int,
                before: Position | None) -> tuple[list[EventItem], Position | None]:
    """A page of events newest first, below `before`, and the position after it (None on the
    last page: one more row than asked for tells)."""
    sql, params = _events_query(database, found, limit + 1, before, newest_first=True)
    rows = client.query(sql, parameters=params).result_rows
    more = len(rows) > limit
    rows = rows[:limit]
    return [event_item(row) for row in rows], ((rows[-1][1], rows[-1][0]) if more else None)


def event_chunks(client: Client, database: str, found: EventFilter, size: int
                 ) -> Iterator[pa.Table]:
    """Every event of the range, oldest first, `size` rows a query, as Arrow tables of
    `EVENT_COLUMNS` (the store answers Arrow: no Python object per value)."""
    schema = arrow_schema(EVENT_COLUMNS)
    after: Position | None = None
    while True:
        sql, params = _events_query(database, found, size, after, newest_first=False)
        table = client.query_arrow(sql, parameters=params)
        if table.num_rows:
            after = (table.column(1)[-1].as_py(), table.column(0)[-1].as_py())
            yield table.rename_columns(schema.names).cast(schema)
        if table.num_rows < size:
            return


def rollup_chunks(client: Client, database: str, data: ExportData, found: EventFilter,
                  size: int) -> Iterator[pa.Table]:
    """Every rollup row whose bucket starts in the range, by bucket then service, `size` rows
    a query (keyset on the pair), as Arrow tables of `ROLLUP_COLUMNS`."""
    table = f"{database}.{ROLLUP_TABLES[data]}"
    schema = arrow_schema(ROLLUP_COLUMNS)
    where, params = found.where("bucket_start")
    params["limit"] = size
    after: tuple[int, str] | None = None
    while True:
        keyset = ""
        if after is not None:
            keyset = (" AND (bucket_start, service) > "
                      "(toDateTime(intDiv({after_ms:Int64}, 1000), 'UTC'), {after_service:String})")
            params["after_ms"], params["after_service"] = after
        rows = client.query(
            f"SELECT {_ROLLUP_SELECT} FROM {table} FINAL WHERE {where}{keyset} "
            "ORDER BY bucket_start, service LIMIT {limit:UInt32}",
            parameters=params,
        ).result_rows
        if rows:
            after = (rows[-1][0], rows[-1][1])
            columns = zip(*map(rollup_row, rows), strict=True)
            yield pa.Table.from_arrays(
                [pa.array(values, type=field.type) for values, field in zip(columns, schema,
                                                                            strict=True)],
                schema=schema)
        if len(rows) < size:
            return


# ---- writers --------------------------------------------------------------------------------


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    return pa.schema([pa.field(column.name, column.arrow) for column in columns])


class _Drain:
    """A write-only file for Arrow's writers whose bytes are taken away after each chunk, so
    the file is never whole in memory."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._written = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _as_text(table: pa.Table) -> pa.Table:
    """Times as RFC 3339 UTC with milliseconds (2026-12-01T12:00:00.000Z), as the JSON
    answers write them."""
    for i, field in enumerate(table.schema):
        if field.type == TIME:
            table = table.set_column(i, field.name,
                                     pc.strftime(table.column(i), format="%Y-%m-%dT%H:%M:%SZ"))
    return table


# RFC 4180 (CRLF); the header's names are plain identifiers, left unquoted.
_CSV_OPTIONS = pacsv.WriteOptions(eol="\r\n", quoting_header="none")


def csv_stream(columns: Sequence[Column], chunks: Iterator[pa.Table]) -> Iterator[bytes]:
    """CSV (RFC 4180), UTF-8: a header row, then each chunk's rows as one write. Strings are
    quoted (an empty one as ""), a null is an empty cell, times RFC 3339 UTC, booleans
    true/false, a float its shortest exact form."""
    schema = _as_text(arrow_schema(columns).empty_table()).schema
    drain = _Drain()
    writer = pacsv.CSVWriter(drain, schema, write_options=_CSV_OPTIONS)
    try:
        yield drain.take()  # the header
        for table in chunks:
            writer.write_table(_as_text(table))
            yield drain.take()
    finally:
        writer.close()


def parquet_stream(columns: Sequence[Column], chunks: Iterator[pa.Table]) -> Iterator[bytes]:
    """A parquet file, one row group per chunk, each written out before the next is read."""
    drain = _Drain()
    writer = pq.ParquetWriter(drain, arrow_schema(columns))
    try:
        for table in chunks:
            writer.write_table(table)
            yield drain.take()
    finally:
        writer.close()
    yield drain.take()  # the footer


WRITERS: dict[ExportFormat, Callable[[Sequence[Column], Iterator[pa.Table]], Iterator[bytes]]] = {
    ExportFormat.CSV: csv_stream,
    ExportFormat.PARQUET: parquet_stream,
}

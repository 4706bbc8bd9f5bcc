"""Read queries: one function per question the API asks ClickHouse.

The pattern every query follows: a plain function taking the client (`ClickHouseDep`) and
typed arguments, SQL written out here with server-side parameters (`{name:Type}`, never
string formatting of a value), the database named explicitly, and typed rows out (msgspec
Structs that `MsgspecResponse` encodes). A user's queries take the user id from the token
(`CurrentUserDep`), never from a parameter (DESIGN §8).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from clickhouse_connect.driver.client import Client

from core.clock import from_ms
from core.system import StoreFigures
from schemas.audit import AuditRecord
from schemas.system import ClickHouseStats, TableStats


class TableRows(msgspec.Struct, frozen=True):
    table: str
    rows: int


class TableList(msgspec.Struct, frozen=True):
    items: list[TableRows]
    next_cursor: str | None = None


def table_rows(client: Client, database: str) -> list[TableRows]:
    """Every table of `database` with its row count (active parts), by name."""
    result = client.query(
        "SELECT name, toUInt64(ifNull(total_rows, 0)) FROM system.tables "
        "WHERE database = {database:String} AND NOT is_temporary ORDER BY name",
        parameters={"database": database},
    )
    return [TableRows(str(name), int(rows)) for name, rows in result.result_rows]


# -- the store, for the system snapshot (core/system.py) ------------------------------------


def store_figures(client: Client, database: str, window_ms: int) -> StoreFigures:
    """Rows, bytes and active parts of every table of `database` (system.parts: what
    count() answers before ReplacingMergeTree merges; a table without parts is empty), and
    the newest stored event time and stats window end (the newest window's start +
    `window_ms`): the dataflow's freshness as the store shows it. Both maxima are of
    partition-key columns, which the parts' min/max indexes answer without a scan."""
    measured_at = datetime.now(UTC)
    parts = {
        str(table): (int(rows), int(compressed), int(uncompressed), int(count))
        for table, rows, compressed, uncompressed, count in client.query(
            "SELECT table, sum(rows), sum(data_compressed_bytes), "
            "sum(data_uncompressed_bytes), count() FROM system.parts "
            "WHERE database = {database:String} AND active GROUP BY table",
            parameters={"database": database},
        ).result_rows
    }
    names = [str(name) for (name,) in client.query(
        "SELECT name FROM system.tables WHERE database = {database:String} "
        "AND NOT is_temporary AND engine LIKE '%MergeTree' ORDER BY name",
        parameters={"database": database},
    ).result_rows]
    tables = []
    for name in sorted({*names, *parts}):
        rows, compressed, uncompressed, count = parts.get(name, (0, 0, 0, 0))
        tables.append(TableStats(table=name, rows=rows, bytes_compressed=compressed,
                                 bytes_uncompressed=uncompressed, parts=count))
    events_ms, events = client.query(
        f"SELECT toUnixTimestamp64Milli(max(ts)), count() FROM {database}.usage_events"
    ).result_rows[0]
    windows_ms, windows = client.query(
        f"SELECT toUnixTimestamp64Milli(max(window_start)), count() FROM {database}.usage_stats"
    ).result_rows[0]
    return StoreFigures(
        stats=ClickHouseStats(database=database, measured_at=measured_at, tables=tables),
        newest_event_ms=int(events_ms) if events else None,
        newest_window_end_ms=int(windows_ms) + window_ms if windows else None,
    )


# -- the audit trail (`GET /v1/admin/audit`) -------------------------------------------------


class AuditList(msgspec.Struct, frozen=True):
    items: list[AuditRecord]
    next_cursor: str | None = None


@dataclass(frozen=True)
class AuditFilter:
    """What `GET /v1/admin/audit` asks for; an `action` ending in "." is a prefix."""

    actor: str | None = None
    action: str | None = None
    user_id: str | None = None
    target: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses, params = ["1"], {}
        for column in ("actor", "user_id", "target"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = {{{column}:String}}")
                params[column] = value
        if self.action is not None:
            test = "startsWith(action, {action:String})" if self.action.endswith(".") \
                else "action = {action:String}"
            clauses.append(test)
            params["action"] = self.action
        if self.from_ms is not None:
            clauses.append("at >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')")
            params["from_ms"] = self.from_ms
        if self.to_ms is not None:
            clauses.append("at < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')")
            params["to_ms"] = self.to_ms
        return " AND ".join(clauses), params


AuditPosition = tuple[int, str]  # (at in epoch ms, audit_id) of the last record of a page


def audit_page(client: Client, database: str, found: AuditFilter, limit: int,
               before: AuditPosition | None) -> tuple[list[AuditRecord], AuditPosition | None]:
    """Audit records newest first (FINAL: one per audit_id), strictly below `before` in
    (at, audit_id), and the position after the page (None on the last page)."""
    where, params = found.where()
    if before is not None:
        where += (" AND (at, audit_id) < "
                  "(fromUnixTimestamp64Milli({before_ms:Int64}, 'UTC'), {before_id:String})")
        params["before_ms"], params["before_id"] = before
    params["limit"] = limit + 1
    rows = client.query(
        "SELECT audit_id, toUnixTimestamp64Milli(at), actor, roles, action, target, user_id, "
        f"remote_addr, user_agent, details, schema_version FROM {database}.audit_log FINAL "
        f"WHERE {where} ORDER BY at DESC, audit_id DESC LIMIT {{limit:UInt32}}",
        parameters=params,
    ).result_rows
    more = len(rows) > limit
    records = [
        AuditRecord(audit_id=str(audit_id), at=from_ms(int(at_ms)), actor=str(actor),
                    roles=[str(role) for role in roles], action=str(action), target=str(target),
                    user_id=str(user_id), remote_addr=str(remote_addr),
                    user_agent=str(user_agent),
                    details={str(k): str(v) for k, v in dict(details).items()},
                    schema_version=int(version))
        for (audit_id, at_ms, actor, roles, action, target, user_id, remote_addr, user_agent,
             details, version) in rows[:limit]
    ]
    last = (int(rows[limit - 1][1]), str(rows[limit - 1][0])) if more else None
    return records, last

"""Read queries: one function per question the API asks ClickHouse.

The pattern every query follows: a plain function taking the client (`ClickHouseDep`) and
typed arguments, SQL written out here with server-side parameters (`{name:Type}`, never
string formatting of a value), the database named explicitly, and typed rows out (msgspec
Structs that `MsgspecResponse` encodes). A user's queries take the user id from the token
(`CurrentUserDep`), never from a parameter (DESIGN §8).
"""

from __future__ import annotations

import msgspec
from clickhouse_connect.driver.client import Client


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

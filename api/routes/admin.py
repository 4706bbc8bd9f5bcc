"""Administration (role `admin`): what the store holds."""

from __future__ import annotations

from fastapi import APIRouter

from api import queries
from api.deps import AdminDep, ClickHouseDep, SettingsDep
from api.responses import MsgspecResponse, described, failures

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_TABLES = described(queries.TableList, description="every table, by name")
_TABLES[200]["content"]["application/json"]["example"] = {
    "items": [{"table": "usage_events", "rows": 120000}, {"table": "usage_stats", "rows": 5400}],
    "next_cursor": None,
}


@router.get("/tables", summary="tables and row counts",
            responses={**_TABLES, **failures({401: "no valid bearer token",
                                              403: "the token does not hold the admin role"})})
def tables(_user: AdminDep, client: ClickHouseDep, settings: SettingsDep) -> MsgspecResponse:
    """Every keypulse table with its row count (active parts: an estimate until merges of
    the ReplacingMergeTree tables settle)."""
    rows = queries.table_rows(client, settings.clickhouse_database)
    return MsgspecResponse(queries.TableList(items=rows))

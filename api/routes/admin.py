"""Administration (role `admin`): what the store holds."""

from __future__ import annotations

from fastapi import APIRouter

from api import queries
from api.deps import AdminDep, ClickHouseDep, SettingsDep
from api.responses import MsgspecResponse, described

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/tables", responses=described(queries.TableList))
def tables(_user: AdminDep, client: ClickHouseDep, settings: SettingsDep) -> MsgspecResponse:
    """Every keypulse table with its row count."""
    rows = queries.table_rows(client, settings.clickhouse_database)
    return MsgspecResponse(queries.TableList(items=rows))

"""`GET /v1/admin/tables`: the first route on ClickHouseDep and a role, on the real engine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.deps import get_clickhouse
from core.settings import Settings
from infra.clickhouse.migrate import migrate


def _no_clickhouse() -> None:
    raise AssertionError("ClickHouse opened before the caller was authorised")


@pytest.mark.parametrize(("roles", "status"), [(None, 401), (("user",), 403),
                                                (("analyst",), 403)])
def test_only_admins_reach_the_store(app: FastAPI, token: Callable[..., str],
                                     roles: tuple[str, ...] | None, status: int) -> None:
    app.dependency_overrides[get_clickhouse] = _no_clickhouse
    headers = {} if roles is None else {"Authorization": f"Bearer {token(roles=roles)}"}
    with TestClient(app) as client:
        response = client.get("/v1/admin/tables", headers=headers)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"code", "message"}


def test_admins_see_every_table_with_its_row_count(
    app: FastAPI, api_settings: Settings, token: Callable[..., str], clickhouse_engine: Client
) -> None:
    store = clickhouse_engine
    migrate(store, api_settings)
    store.command(
        "INSERT INTO keypulse.notifications (notification_id, user_id, created_at) "
        "VALUES ('n1', 'u1', now64(3)), ('n2', 'u1', now64(3)), ('n3', 'u2', now64(3))")
    tables = {row[0] for row in store.query(
        "SELECT name FROM system.tables WHERE database = 'keypulse'").result_rows}
    app.dependency_overrides[get_clickhouse] = lambda: store
    with TestClient(app) as client:
        response = client.get("/v1/admin/tables",
                              headers={"Authorization": f"Bearer {token(roles=('admin',))}"})
    assert response.status_code == 200
    body = response.json()
    assert body["next_cursor"] is None
    rows = {item["table"]: item["rows"] for item in body["items"]}
    assert set(rows) == tables
    assert {"usage_events", "usage_stats", "alerts", "notifications"} <= tables
    assert rows["notifications"] == 3
    assert rows["usage_stats"] == 0
    assert [item["table"] for item in body["items"]] == sorted(tables)

"""`GET /v1/admin/audit` on the real engine: filters, newest first, keyset pages, FINAL.

The trail is seeded the way routes write it: `audit.entry` (from a request) and `audit.write`.
One engine and one trail for the module (opening and migrating chDB is the slow part).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request

from api import audit, create_app
from api.deps import get_clickhouse
from api.params import encode_cursor
from core.auth import Principal, mint_token
from core.clock import ManualClock
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from schemas.audit import AuditRecord
from tests.integration.harness import embedded

pytestmark = pytest.mark.integration  # the real engine, opened by this module's fixture

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ADMIN = Principal(user_id="root", roles=("admin",), expires_at=0.0)
SERVICE = Principal(user_id="keys-backend", roles=("service",), expires_at=0.0)
SAME = Principal(user_id="same-instant", roles=("admin",), expires_at=0.0)


def _request(app: FastAPI) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "app": app,
                    "headers": [(b"user-agent", b"pytest")], "client": ("10.0.0.7", 4242)})


def _seed(app: FastAPI) -> list[AuditRecord]:
    """Nine changes, one a second from T0, by two actors, of three kinds; and five by a third
    actor at one instant, a day before."""
    request = _request(app)
    made = [
        (ADMIN, "alert_rule.create", "r1", "u1"),
        (ADMIN, "alert_rule.update", "r1", "u1"),
        (SERVICE, "api_key.created", "k1", "u2"),
        (ADMIN, "announcement.send", "n1", "*"),
        (ADMIN, "alert_rule.delete", "r1", "u1"),
        (SERVICE, "api_key.rotated", "k1", "u2"),
        (ADMIN, "alert_rule.create", "r2", "u3"),
        (SERVICE, "api_key.deleted", "k1", "u2"),
        (ADMIN, "alert_rule.create", "r3", "u1"),
    ]
    records = []
    for second, (who, action, target, user_id) in enumerate(made):
        record = audit.entry(request, who, action, target=target, user_id=user_id,
                             details={"n": second})
        records.append(_at(record, T0 + timedelta(seconds=second)))
    records += [_at(audit.entry(request, SAME, "alert_rule.update", target=f"r{i}"),
                    T0 - timedelta(days=1)) for i in range(5)]
    return records


def _at(record: AuditRecord, at: datetime) -> AuditRecord:
    fields = {name: getattr(record, name) for name in record.__struct_fields__}
    return AuditRecord(**{**fields, "at": at})


@dataclass(frozen=True)
class Served:
    app: FastAPI
    settings: Settings
    client: Client
    trail: list[AuditRecord]
    get: Callable[..., Any]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("audit") / "clickhouse"
    settings = load(dev=True, data_dir=path.parent, clickhouse_dsn=f"chdb://{path}",
                    kafka_bootstrap="127.0.0.1:1", topic_prefix=f"a{uuid.uuid4().hex[:8]}.")
    clock = ManualClock()
    headers = {"Authorization": "Bearer " + mint_token(settings, "root", roles=("admin",),
                                                       clock=clock)}
    with embedded(path) as client:
        migrate(client, settings)
        app = create_app(settings, clock=clock)
        app.dependency_overrides[get_clickhouse] = lambda: client
        records = _seed(app)
        audit.write(client, settings, records[:5])
        audit.write(client, settings, records[5:])
        audit.write(client, settings, records[2:4])  # written twice: a retry
        with TestClient(app) as http:
            yield Served(app, settings, client, records, lambda **params: http.get(
                "/v1/admin/audit", params=params, headers=headers))


@pytest.fixture
def trail(served: Served) -> list[AuditRecord]:
    return served.trail


@pytest.fixture
def get(served: Served) -> Callable[..., Any]:
    return served.get


def _ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["audit_id"] for item in response.json()["items"]]


def _newest_first(records: list[AuditRecord]) -> list[str]:
    return [r.audit_id for r in sorted(records, key=lambda r: (r.at, r.audit_id), reverse=True)]


def test_everything_newest_first_once_each(trail: list[AuditRecord], get: Any) -> None:
    response = get()
    assert _ids(response) == _newest_first(trail)
    body = response.json()
    assert body["next_cursor"] is None
    first = next(item for item in body["items"] if item["audit_id"] == trail[0].audit_id)
    assert first == {  # every field as it was written
        "audit_id": trail[0].audit_id, "at": "2026-11-30T12:00:00Z", "actor": "root",
        "roles": ["admin"], "action": "alert_rule.create", "target": "r1", "user_id": "u1",
        "remote_addr": "10.0.0.7", "user_agent": "pytest", "details": {"n": "0"},
        "schema_version": 1}


@pytest.mark.parametrize(("params", "kept"), [
    ({"actor": "keys-backend"}, lambda r: r.actor == "keys-backend"),
    ({"action": "alert_rule.create"}, lambda r: r.action == "alert_rule.create"),
    ({"action": "alert_rule."}, lambda r: r.action.startswith("alert_rule.")),
    ({"action": "alert_rule"}, lambda _r: False),  # no dot: exact, and no action is that
    ({"user_id": "*"}, lambda r: r.user_id == "*"),
    ({"target": "k1"}, lambda r: r.target == "k1"),
    ({"from": "2026-11-30T12:00:03Z"}, lambda r: r.at >= T0 + timedelta(seconds=3)),
    ({"to": str(int((T0 + timedelta(seconds=3)).timestamp() * 1000))},
     lambda r: r.at < T0 + timedelta(seconds=3)),
    ({"from": "2026-11-30T12:00:02Z", "to": "2026-11-30T12:00:06Z", "actor": "root",
      "action": "alert_rule."},
     lambda r: T0 + timedelta(seconds=2) <= r.at < T0 + timedelta(seconds=6)
     and r.actor == "root" and r.action.startswith("alert_rule.")),
])
def test_filters(trail: list[AuditRecord], get: Any, params: dict[str, str],
                 kept: Callable[[AuditRecord], bool]) -> None:
    assert _ids(get(**params)) == _newest_first([r for r in trail if kept(r)])


def test_pages_cover_the_trail_once(trail: list[AuditRecord], get: Any) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        response = get(limit=2, **({} if cursor is None else {"cursor": cursor}))
        ids = _ids(response)
        assert 1 <= len(ids) <= 2
        seen += ids
        pages += 1
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == 7
    assert seen == _newest_first(trail)
    # with a filter: the cursor continues within it
    first = get(limit=1, action="api_key.")
    rest = get(limit=10, action="api_key.", cursor=first.json()["next_cursor"])
    assert _ids(first) + _ids(rest) == _newest_first(
        [r for r in trail if r.action.startswith("api_key.")])
    assert rest.json()["next_cursor"] is None


def test_records_at_the_same_instant_page_by_id(trail: list[AuditRecord], get: Any) -> None:
    same = [r.audit_id for r in trail if r.actor == SAME.user_id]
    first = get(limit=3, actor=SAME.user_id)
    rest = get(limit=3, actor=SAME.user_id, cursor=first.json()["next_cursor"])
    assert _ids(first) + _ids(rest) == sorted(same, reverse=True)
    assert rest.json()["next_cursor"] is None


@pytest.mark.parametrize(("params", "status", "field"), [
    ({"cursor": "not-a-cursor"}, 400, "cursor"),
    ({"cursor": encode_cursor(["usage_events", 1764590400000, "e1"])}, 400, "cursor"),
    ({"from": "yesterday"}, 400, "from"),
    ({"to": "2026-11-30T12:00:00"}, 400, "to"),  # no offset
    ({"from": "2026-11-30T12:00:00Z", "to": "2026-11-30T12:00:00Z"}, 400, "to"),
    ({"limit": "0"}, 422, "limit"),
    ({"limit": "1001"}, 422, "limit"),
    ({"limit": "many"}, 422, "limit"),
    ({"actor": ""}, 422, "actor"),
    ({"target": "x" * 257}, 422, "target"),
])
def test_bad_parameters(trail: list[AuditRecord], get: Any, params: dict[str, str],
                        status: int, field: str) -> None:
    response = get(**params)
    assert response.status_code == status
    assert response.json()["error"]["field"] == field


def test_nothing_matches(get: Any) -> None:
    assert get(actor="nobody").json() == {"items": [], "next_cursor": None}

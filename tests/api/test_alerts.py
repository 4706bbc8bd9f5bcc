"""`GET /v1/alerts`: one item per alert in its latest state, firing first then newest, the
`state`, `service` and `from`/`to` filters, keyset pages that neither repeat nor skip, refused
cursors and ranges, and only the caller's own alerts. On the real engine (alerts rows as the
pipeline writes them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import create_app
from api.params import encode_cursor
from core import clickhouse
from core.auth import ADMIN_ROLE, INGEST_ROLE, SERVICE_ROLE, mint_token
from core.clock import ManualClock
from core.outputs import ALERTS_OUTPUT, insert_records
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from schemas.alerts import Alert, AlertState, Metric, Op, Severity

PATH = "/v1/alerts"
NOW_MS = int(time.time()) // 60 * 60_000
MINUTE = 60_000


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def alert(user: str, alert_id: str, fired_ms: int, *, service: str = "openai",
          resolved_ms: int | None = None) -> Alert:
    return Alert(alert_id=alert_id, rule_id="rule_x", rule_name="errors", user_id=user,
                 service=service, metric=Metric.ERROR_RATE, op=Op.GT, threshold=0.05,
                 value=0.2, severity=Severity.WARNING,
                 state=AlertState.FIRING if resolved_ms is None else AlertState.RESOLVED,
                 window_start=at(fired_ms - 10_000), window_end=at(fired_ms),
                 fired_at=at(fired_ms),
                 resolved_at=None if resolved_ms is None else at(resolved_ms),
                 message=f"{alert_id} of {user}")


@dataclass(frozen=True)
class World:
    http: TestClient
    settings: Settings
    clock: ManualClock

    def get(self, user: str, roles: tuple[str, ...] = (), **params: Any) -> Any:
        token = mint_token(self.settings, user, roles=roles, ttl_seconds=600, clock=self.clock)
        return self.http.get(PATH, params=params, headers={"Authorization": f"Bearer {token}"})

    def ids(self, user: str, **params: Any) -> list[str]:
        response = self.get(user, **params)
        assert response.status_code == 200, response.text
        return [item["alert_id"] for item in response.json()["items"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """alice: a1 (fired 50 min ago, resolved), a2 (40, firing), a3 (30, resolved), a4 (20,
    firing, stripe), a5 (10, firing); bob: b1 (firing, now). Each resolved alert has its
    firing row too, as the pipeline writes them."""
    from tests.integration.harness import embedded

    path = tmp_path_factory.mktemp("alerts")
    app_settings = load(dev=True, data_dir=path, clickhouse_dsn=f"chdb://{path / 'ch'}",
                        kafka_bootstrap="127.0.0.1:1", topic_prefix=f"h{uuid.uuid4().hex[:8]}.")
    clock = ManualClock(NOW_MS / 1000)
    firing = [alert("alice", f"a{n}", NOW_MS - (6 - n) * 10 * MINUTE,
                    service="stripe" if n == 4 else "openai") for n in range(1, 6)]
    resolved = [alert("alice", f"a{n}", NOW_MS - (6 - n) * 10 * MINUTE,
                      resolved_ms=NOW_MS - (6 - n) * 10 * MINUTE + 5 * MINUTE) for n in (1, 3)]
    with embedded(path / "ch") as engine, pytest.MonkeyPatch.context() as patch:
        migrate(engine, app_settings)
        insert_records(engine, ALERTS_OUTPUT, app_settings.clickhouse_database,
                       [*firing, alert("bob", "b1", NOW_MS)])
        insert_records(engine, ALERTS_OUTPUT, app_settings.clickhouse_database,
                       list(resolved))  # later, as the pipeline would
        patch.setitem(clickhouse._shared, app_settings.dsn, engine)
        with TestClient(create_app(app_settings, clock=clock)) as http:
            yield World(http, app_settings, clock)


def test_firing_first_then_newest_one_item_per_alert(world: World) -> None:
    response = world.get("alice")
    assert response.status_code == 200
    body = response.json()
    assert [(item["alert_id"], item["state"]) for item in body["items"]] == [
        ("a5", "firing"), ("a4", "firing"), ("a2", "firing"), ("a3", "resolved"),
        ("a1", "resolved")]
    assert body["next_cursor"] is None
    a3 = body["items"][3]
    assert a3["resolved_at"] is not None and a3["fired_at"] < a3["resolved_at"]
    assert a3["message"] == "a3 of alice" and a3["user_id"] == "alice"


def test_filters(world: World) -> None:
    assert world.ids("alice", state="firing") == ["a5", "a4", "a2"]
    assert world.ids("alice", state="resolved") == ["a3", "a1"]
    assert world.ids("alice", service="stripe") == ["a4"]
    assert world.ids("alice", service="stripe", state="resolved") == []
    since = NOW_MS - 35 * MINUTE
    assert world.ids("alice", **{"from": since}) == ["a5", "a4", "a3"]
    assert world.ids("alice", **{"from": since, "to": NOW_MS - 20 * MINUTE}) == ["a3"]
    assert world.ids("alice", to=datetime.fromtimestamp((NOW_MS - 40 * MINUTE) / 1000,
                                                        tz=UTC).isoformat()) == ["a1"]


def test_pages_walk_every_alert_once(world: World) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = world.get("alice", **params)
        assert response.status_code == 200
        body = response.json()
        seen += [item["alert_id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["a5", "a4", "a2", "a3", "a1"] and pages == 3


def test_only_the_callers_own_alerts(world: World) -> None:
    assert world.ids("bob") == ["b1"]
    assert world.ids("bob", user_id="alice") == ["b1"]
    assert world.ids("carol") == []
    assert world.ids("alice", roles=(ADMIN_ROLE,))[0] == "a5"  # an admin reads their own
    first = world.get("alice", limit=1).json()["next_cursor"]
    assert world.ids("bob", cursor=first) == []  # past alice's a5: nothing of bob's is older


@pytest.mark.parametrize(("params", "status", "field"), [
    ({"cursor": "not-a-cursor"}, 400, "cursor"),
    ({"cursor": encode_cursor(["usage_events", 1, "x"])}, 400, "cursor"),
    ({"from": "yesterday"}, 400, "from"),
    ({"from": NOW_MS, "to": NOW_MS}, 400, "to"),
    ({"state": "open"}, 422, "state"),
    ({"limit": 0}, 422, "limit"),
    ({"limit": 501}, 422, "limit"),
    ({"service": "Not A Service"}, 422, "service"),
])
def test_bad_parameters(world: World, params: dict[str, Any], status: int, field: str) -> None:
    response = world.get("alice", **params)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


def test_who_may_read(world: World) -> None:
    assert world.http.get(PATH).status_code == 401
    for role in (INGEST_ROLE, SERVICE_ROLE):
        assert world.get("alice", roles=(role,)).status_code == 403

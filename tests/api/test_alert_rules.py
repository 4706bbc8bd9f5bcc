"""`/v1/alert-rules`: every route and status, the checks of a rule's fields, versions (ETag,
If-Match, 409, 428), the defaults (shown, overridden, disabled, restored), templates an admin
stored, tenant isolation, and, held against the pipeline's RuleBook, that the list is what the
pipeline evaluates. Through the real broker (alert.rules) and the real engine (alert_rules)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import create_app, rules
from core import clickhouse
from core.auth import ADMIN_ROLE, ANALYST_ROLE, INGEST_ROLE, SERVICE_ROLE, USER_ROLE, mint_token
from core.clock import ManualClock
from core.outputs import ALERT_RULES_OUTPUT, insert, rule_row
from core.settings import Settings
from core.topics import ALERT_RULES
from infra.clickhouse.migrate import migrate
from infra.kafka import launcher
from pipeline.alerting.rules import RuleBook
from schemas.alerts import AlertRule, Metric, default_rule_id, default_rules
from tests.api.live import read_topic

PATH = "/v1/alert-rules"
RULE = {"name": "checkout errors", "metric": "error_rate", "op": ">", "threshold": 0.1,
        "service": "stripe", "for_windows": 2, "resolve_windows": 3, "min_requests": 50,
        "severity": "critical", "enabled": True}
DEFAULT_NAMES = ("error_rate", "latency_p95_ms", "requests_anomaly")


@dataclass(frozen=True)
class World:
    http: TestClient
    settings: Settings
    engine: Client
    clock: ManualClock

    def auth(self, user: str, *roles: str) -> dict[str, str]:
        token = mint_token(self.settings, user, roles=roles, ttl_seconds=3600, clock=self.clock)
        return {"Authorization": f"Bearer {token}"}

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.engine.query(sql).result_rows]


@pytest.fixture(scope="module")
def world(kafka: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One app for the module on its own topics and engine (tests keep apart by user)."""
    path = tmp_path_factory.mktemp("alert-rules")
    app_settings = kafka.model_copy(update={
        "topic_prefix": f"r{uuid.uuid4().hex[:8]}.", "data_dir": path,
        "clickhouse_dsn": f"chdb://{path / 'clickhouse'}"})
    launcher.ensure_topics(app_settings)
    from tests.integration.harness import embedded

    clock = ManualClock(float(int(time.time())))
    with embedded(path / "clickhouse") as engine, pytest.MonkeyPatch.context() as patch:
        migrate(engine, app_settings)
        patch.setitem(clickhouse._shared, app_settings.dsn, engine)  # routes' and audit's
        try:
            with TestClient(create_app(app_settings, clock=clock)) as http:
                yield World(http, app_settings, engine, clock)
        finally:
            launcher.delete_topics(app_settings)


@pytest.fixture
def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def create(world: World, user: str, **fields: Any) -> dict[str, Any]:
    response = world.http.post(PATH, json={**RULE, **fields}, headers=world.auth(user))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def listed(world: World, user: str) -> dict[str, dict[str, Any]]:
    response = world.http.get(PATH, headers=world.auth(user))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next_cursor"] is None
    return {item["rule_id"]: item for item in body["items"]}


def published(world: World, rule_id: str) -> list[bytes | None]:
    """The values on alert.rules under `rule_id`, in order (None: a tombstone)."""
    return [value for key, value in read_topic(world.settings, ALERT_RULES)
            if key == rule_id.encode()]


# --- reading -------------------------------------------------------------------------------


def test_a_new_user_sees_the_defaults(world: World, user: str) -> None:
    items = listed(world, user)
    assert set(items) == {default_rule_id(user, name) for name in DEFAULT_NAMES}
    error_rate = items[default_rule_id(user, "error_rate")]
    assert error_rate["default"] is True
    assert (error_rate["metric"], error_rate["op"], error_rate["threshold"],
            error_rate["for_windows"], error_rate["version"], error_rate["user_id"],
            error_rate["overridden_by"], error_rate["updated_at"]) == (
        "error_rate", ">", 0.05, 2, 0, user, [], None)
    response = world.http.get(f"{PATH}/{default_rule_id(user, 'latency_p95_ms')}",
                              headers=world.auth(user))
    assert response.status_code == 200
    assert response.headers["ETag"] == '"0"'
    assert response.json()["threshold"] == 2000.0


def test_create_publishes_stores_audits_and_answers_the_stored_rule(world: World,
                                                                    user: str) -> None:
    response = world.http.post(PATH, json=RULE, headers=world.auth(user))
    assert response.status_code == 201, response.text
    rule = response.json()
    rule_id = rule["rule_id"]
    assert rule_id.startswith("rule_") and rule["version"] == 1 and rule["user_id"] == user
    assert {name: rule[name] for name in RULE} == RULE
    assert rule["default"] is False and rule["overrides"] == []  # filtered: replaces nothing
    assert response.headers["ETag"] == '"1"'
    assert response.headers["Location"] == f"{PATH}/{rule_id}"

    [value] = published(world, rule_id)
    on_kafka = msgspec.json.decode(value or b"", type=AlertRule)
    assert (on_kafka.user_id, on_kafka.version, on_kafka.threshold) == (user, 1, 0.1)

    items = listed(world, user)  # at once: the API wrote the row itself
    assert items[rule_id]["version"] == 1 and items[rule_id]["updated_at"]
    assert default_rule_id(user, "error_rate") in items  # a filtered rule keeps the default
    fetched = world.http.get(f"{PATH}/{rule_id}", headers=world.auth(user))
    assert fetched.status_code == 200 and fetched.json() == items[rule_id]
    assert fetched.headers["ETag"] == '"1"'
    assert world.rows(
        "SELECT action, actor, user_id, details['version'] FROM keypulse.audit_log FINAL "
        f"WHERE target = '{rule_id}'") == [("alert_rule.create", user, user, "1")]


def test_an_admin_manages_their_own_rules(world: World, user: str) -> None:
    response = world.http.post(PATH, json=RULE, headers=world.auth(user, ADMIN_ROLE))
    assert response.status_code == 201
    assert response.json()["user_id"] == user


# --- checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"metric": "error_ratio"}, "metric"),
    ({"metric": None}, "metric"),
    ({"op": "=="}, "op"),
    ({"severity": "fatal"}, "severity"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
    ({"metric": "success_rate", "threshold": 2}, "threshold"),
    ({"metric": "latency_p95_ms", "threshold": -1}, "threshold"),
    ({"metric": "latency_p99_ms", "threshold": 3_600_001}, "threshold"),
    ({"metric": "requests", "threshold": -5}, "threshold"),
    ({"metric": "cost_usd", "threshold": 1e16}, "threshold"),
    ({"metric": "requests_anomaly", "threshold": 1001}, "threshold"),
    ({"threshold": "0.1"}, "threshold"),
    ({"for_windows": 0}, "for_windows"),
    ({"for_windows": 1001}, "for_windows"),
    ({"resolve_windows": 0}, "resolve_windows"),
    ({"min_requests": -1}, "min_requests"),
    ({"min_requests": 2**32}, "min_requests"),
    ({"name": ""}, "name"),
    ({"name": "n" * 129}, "name"),
    ({"service": "Stripe Payments"}, "service"),
    ({"enabled": "yes"}, "enabled"),
    ({"colour": "red"}, "colour"),
    ({"rule_id": "rule_mine"}, "rule_id"),
    ({"user_id": "someone-else"}, "user_id"),
    ({"version": 7}, "version"),
])
def test_invalid_rules_are_refused_naming_the_field(world: World, user: str,
                                                    change: dict[str, Any], field: str) -> None:
    response = world.http.post(PATH, json={**RULE, **change}, headers=world.auth(user))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field, error
    assert listed(world, user).keys() == {default_rule_id(user, n) for n in DEFAULT_NAMES}


@pytest.mark.parametrize("missing", ["name", "metric", "threshold"])
def test_a_required_field_left_out_is_named(world: World, user: str, missing: str) -> None:
    body = {name: value for name, value in RULE.items() if name != missing}
    response = world.http.post(PATH, json=body, headers=world.auth(user))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == missing


@pytest.mark.parametrize(("body", "status"), [(b"{not json", 400), (b"[]", 422),
                                              (b"x" * 20_000, 413)])
def test_a_body_that_is_no_rule(world: World, user: str, body: bytes, status: int) -> None:
    response = world.http.post(PATH, content=body, headers=world.auth(user))
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_the_fields_left_out_take_their_defaults(world: World, user: str) -> None:
    response = world.http.post(PATH, json={"name": "spend", "metric": "cost_usd",
                                           "threshold": 5}, headers=world.auth(user))
    assert response.status_code == 201
    minimal = response.json()
    assert {name: minimal[name] for name in ("op", "service", "for_windows", "resolve_windows",
                                             "min_requests", "severity", "enabled")} == {
        "op": ">", "service": None, "for_windows": 1, "resolve_windows": 1,
        "min_requests": 20, "severity": "warning", "enabled": True}


def test_a_user_has_at_most_so_many_rules(world: World, user: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "MAX_RULES_PER_USER", 2)
    create(world, user)
    create(world, user)
    response = world.http.post(PATH, json=RULE, headers=world.auth(user))
    assert response.status_code == 409
    assert "2 alert rules" in response.json()["error"]["message"]
    assert len([item for item in listed(world, user).values() if not item["default"]]) == 2


# --- versions ------------------------------------------------------------------------------


def test_updates_need_the_current_version(world: World, user: str) -> None:
    rule_id = create(world, user)["rule_id"]
    url, auth = f"{PATH}/{rule_id}", world.auth(user)
    changed = {**RULE, "threshold": 0.2}

    response = world.http.put(url, json=changed, headers=auth)
    assert response.status_code == 428
    assert response.json()["error"]["code"] == "precondition_required"

    response = world.http.put(url, json=changed, headers={**auth, "If-Match": '"1"'})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2 and response.json()["threshold"] == 0.2
    assert response.headers["ETag"] == '"2"'

    stale = world.http.put(url, json=changed, headers={**auth, "If-Match": '"1"'})
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "conflict"
    assert "version 2" in stale.json()["error"]["message"]

    by_body = world.http.put(url, json={**changed, "threshold": 0.3, "version": 2}, headers=auth)
    assert by_body.status_code == 200 and by_body.json()["version"] == 3
    assert world.http.put(url, json={**changed, "version": 2}, headers=auth).status_code == 409
    disagree = world.http.put(url, json={**changed, "version": 3},
                              headers={**auth, "If-Match": '"2"'})
    assert disagree.status_code == 400

    anything = world.http.put(url, json={**changed, "enabled": False},
                              headers={**auth, "If-Match": "*"})
    assert anything.status_code == 200 and anything.json()["version"] == 4
    for malformed in ("3", "W/\"3\"", '"three"'):
        response = world.http.put(url, json=changed, headers={**auth, "If-Match": malformed})
        assert response.status_code == 422, malformed

    assert listed(world, user)[rule_id]["enabled"] is False
    versions = [msgspec.json.decode(value or b"", type=AlertRule).version
                for value in published(world, rule_id)]
    assert versions == [1, 2, 3, 4]
    assert world.rows("SELECT count() FROM keypulse.audit_log FINAL "
                      f"WHERE target = '{rule_id}' AND action = 'alert_rule.update'") == [(3,)]


def test_delete_leaves_a_tombstone_and_honours_if_match(world: World, user: str) -> None:
    rule_id = create(world, user)["rule_id"]
    url, auth = f"{PATH}/{rule_id}", world.auth(user)
    assert world.http.delete(url, headers={**auth, "If-Match": '"7"'}).status_code == 409
    response = world.http.delete(url, headers={**auth, "If-Match": '"1"'})
    assert response.status_code == 204 and response.content == b""
    assert published(world, rule_id)[-1] is None
    assert world.http.get(url, headers=auth).status_code == 404
    assert rule_id not in listed(world, user)
    assert world.http.delete(url, headers=auth).status_code == 404
    assert world.http.put(url, json=RULE, headers={**auth, "If-Match": "*"}).status_code == 404
    assert world.rows("SELECT max(is_deleted), max(version) FROM keypulse.alert_rules "
                      f"WHERE rule_id = '{rule_id}'") == [(1, 1)]


# --- defaults ------------------------------------------------------------------------------


def test_a_default_is_disabled_by_an_override_and_back_when_it_is_deleted(world: World,
                                                                         user: str) -> None:
    default_id = default_rule_id(user, "error_rate")
    url, auth = f"{PATH}/{default_id}", world.auth(user)
    off = {"name": "Error rate above 5%", "metric": "error_rate", "threshold": 0.05,
           "for_windows": 2, "enabled": False}

    refused = world.http.delete(url, headers=auth)
    assert refused.status_code == 409
    assert "disable it instead (PUT enabled=false)" in refused.json()["error"]["message"]

    response = world.http.put(url, json=off, headers={**auth, "If-Match": '"0"'})
    assert response.status_code == 200, response.text
    override = response.json()
    assert (override["rule_id"], override["default"], override["enabled"],
            override["version"], override["overrides"]) == (default_id, False, False, 1,
                                                            [default_id])
    items = listed(world, user)
    assert items[default_id] == override  # listed once: the override, not the default
    assert items[default_rule_id(user, "latency_p95_ms")]["default"] is True

    assert world.http.delete(url, headers={**auth, "If-Match": '"1"'}).status_code == 204
    back = listed(world, user)[default_id]
    assert (back["default"], back["enabled"], back["version"]) == (True, True, 0)

    again = world.http.put(url, json={**off, "threshold": 0.2}, headers={**auth,
                                                                      "If-Match": '"0"'})
    assert again.status_code == 200
    assert again.json()["version"] == 2  # above the deleted override's: the pipeline takes it
    assert [None if value is None else msgspec.json.decode(value, type=AlertRule).version
            for value in published(world, default_id)] == [1, None, 2]


def test_an_unfiltered_rule_with_a_defaults_metric_replaces_it(world: World,
                                                               user: str) -> None:
    mine = create(world, user, service=None)  # error_rate, every service
    filtered = create(world, user, metric="latency_p95_ms", threshold=900.0)
    default_id = default_rule_id(user, "error_rate")
    assert mine["overrides"] == [default_id]
    items = listed(world, user)
    assert default_id not in items
    assert items[mine["rule_id"]]["overrides"] == [default_id]
    assert items[default_rule_id(user, "latency_p95_ms")]["default"] is True  # stays
    assert items[filtered["rule_id"]]["overrides"] == []
    shown = world.http.get(f"{PATH}/{default_id}", headers=world.auth(user)).json()
    assert shown["default"] is True and shown["overridden_by"] == [mine["rule_id"]]


def test_templates_an_admin_stored_apply_to_everyone(world: World, user: str) -> None:
    database = world.settings.clickhouse_database
    stricter = msgspec.structs.replace(default_rules()[0], threshold=0.02, version=3)
    team = AlertRule(rule_id="team:*:cost", user_id="*", name="spend", metric=Metric.COST_USD,
                     threshold=10.0, version=1)
    gone = AlertRule(rule_id="gone:*:tokens", user_id="*", name="tokens", metric=Metric.TOKENS,
                     threshold=1e6, version=1)
    for rule, deleted in ((stricter, False), (team, False), (gone, False), (gone, True)):
        rules.store(world.engine, database, rule, deleted=deleted, updated_ms=0)
    try:
        items = listed(world, user)
        error_rate = items[default_rule_id(user, "error_rate")]
        assert (error_rate["threshold"], error_rate["version"]) == (0.02, 3)
        assert items[f"team:{user}:cost"]["default"] is True
        assert f"gone:{user}:tokens" not in items
    finally:
        world.engine.command(f"ALTER TABLE {database}.alert_rules DELETE WHERE user_id = '*' "
                             "SETTINGS mutations_sync = 1")


# --- who -----------------------------------------------------------------------------------


def test_another_users_rule_is_not_found(world: World, user: str) -> None:
    rule_id = create(world, user)["rule_id"]
    other = world.auth(f"{user}-other")
    url = f"{PATH}/{rule_id}"
    assert world.http.get(url, headers=other).status_code == 404
    assert world.http.put(url, json=RULE, headers={**other, "If-Match": "*"}).status_code == 404
    assert world.http.delete(url, headers=other).status_code == 404
    assert world.http.get(f"{PATH}/{default_rule_id(user, 'error_rate')}",
                          headers=other).status_code == 404
    assert rule_id not in listed(world, f"{user}-other")
    assert world.http.get(url, headers=world.auth(user)).json()["version"] == 1  # untouched


@pytest.mark.parametrize(("method", "path"), [("GET", PATH), ("POST", PATH),
                                              ("GET", f"{PATH}/x"), ("PUT", f"{PATH}/x"),
                                              ("DELETE", f"{PATH}/x")])
def test_callers_without_the_user_or_admin_role_are_refused(world: World, method: str,
                                                            path: str) -> None:
    assert world.http.request(method, path, json=RULE).status_code == 401
    for role in (INGEST_ROLE, SERVICE_ROLE, ANALYST_ROLE):
        response = world.http.request(method, path, json=RULE,
                                      headers={**world.auth("someone", role), "If-Match": "*"})
        assert response.status_code == 403, (role, response.text)
    response = world.http.request(method, path, json=RULE,
                                  headers={**world.auth("someone", USER_ROLE), "If-Match": "*"})
    assert response.status_code in (200, 201, 404)


def test_an_unconfirmed_change_is_a_503_and_changes_nothing(world: World, user: str) -> None:
    offline = world.settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1",
                                                "ingest_timeout_seconds": 0.3})
    with TestClient(create_app(offline, clock=world.clock)) as http:
        response = http.post(PATH, json=RULE, headers=world.auth(user))
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "unavailable"
        assert [item for item in listed(world, user).values() if not item["default"]] == []


# --- the pipeline evaluates what the list shows ------------------------------------------

USERS = ("alice", "*")
IDS = {"alice": ("rule_a", "rule_b", "default:alice:error_rate", "default:alice:latency_p95_ms"),
       "*": ("default:*:error_rate", "default:*:latency_p95_ms", "team:*:cost")}


@st.composite
def changes(draw: st.DrawFn) -> list[tuple[str, str, AlertRule | None]]:
    """API-like histories: versions rise per id; a delete only of a stored rule."""
    stored: dict[str, AlertRule] = {}
    version: dict[str, int] = {}
    made: list[tuple[str, str, AlertRule | None]] = []
    for _ in range(draw(st.integers(1, 12))):
        user = draw(st.sampled_from(USERS))
        rule_id = draw(st.sampled_from(IDS[user]))
        if rule_id in stored and draw(st.booleans()):
            made.append((user, rule_id, None))
            del stored[rule_id]
            continue
        version[rule_id] = version.get(rule_id, 0) + 1
        rule = AlertRule(
            rule_id=rule_id, user_id=user, name=f"n{version[rule_id]}",
            metric=draw(st.sampled_from([Metric.ERROR_RATE, Metric.LATENCY_P95_MS,
                                         Metric.COST_USD])),
            threshold=float(draw(st.integers(0, 1))),
            service=draw(st.sampled_from([None, "stripe"])), enabled=draw(st.booleans()),
            version=version[rule_id])
        stored[rule_id] = rule
        made.append((user, rule_id, rule))
    return made


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=changes())
def test_the_list_is_what_the_pipeline_evaluates(world: World,
                                                 history: list[tuple[str, str,
                                                                     AlertRule | None]]) -> None:
    database = world.settings.clickhouse_database
    world.engine.command(f"TRUNCATE TABLE {database}.alert_rules")  # users keep apart, "*" not
    book = RuleBook()
    last: dict[str, AlertRule] = {}
    rows: list[tuple[str, tuple[Any, ...]]] = []
    for at, (_user, rule_id, rule) in enumerate(history):
        if rule is None:  # the pipeline's row of a tombstone: the last version, deleted
            book.delete(rule_id)
            rows.append((rule_id, rule_row(last[rule_id], deleted=True, updated_ms=at)))
        else:
            book.upsert(rule)
            last[rule_id] = rule
            rows.append((rule_id, rule_row(rule, deleted=False, updated_ms=at)))
    # Two inserts: each id's last row after the others (equal versions: the later insert wins).
    final = {rule_id: index for index, (rule_id, _) in enumerate(rows)}
    for block in ([row for index, (_, row) in enumerate(rows) if final[row[0]] != index],
                  [rows[index][1] for index in final.values()]):
        if block:
            insert(world.engine, ALERT_RULES_OUTPUT, database,
                   b"".join(msgspec.json.encode(row) + b"\n" for row in block))
    try:
        shown = rules.load(world.engine, database, "alice").views()
        evaluated = book._effective("alice")  # the list's counterpart
        assert sorted((v.rule_id, v.name, v.threshold, v.enabled, v.version, v.service)
                      for v in shown) == sorted(
            (r.rule_id, r.name, r.threshold, r.enabled, r.version, r.service) for r in evaluated)
        for view in shown:
            assert view.default is (book.get(view.rule_id) is None)
    finally:
        world.engine.command(f"TRUNCATE TABLE {database}.alert_rules")

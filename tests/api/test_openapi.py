"""The OpenAPI document (`/openapi.json`) is complete, and the API answers as it says.

- Every route of the app is in the document with a summary, a description, described
  parameters with examples, a success schema and documented errors in the error body's shape;
  the document is valid OpenAPI 3.1 (openapi-spec-validator).
- Schemathesis against the app, operation by operation, GENERIC over the document (routes
  added later are covered as they land): generated requests (valid ones, and the document's
  own examples) with the token of each role, or none, on the real embedded engine (migrated,
  seeded) and the real broker; no answer is a 5xx, and every answer (errors included) has a
  documented status, content type, headers and schema.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode, checks
from schemathesis.python import asgi

from api import create_app
from api.deps import get_clickhouse
from api.responses import ErrorBody, schema
from api.routes.notifications import EXAMPLE_DELETE_ID, EXAMPLE_ID
from core import clickhouse
from core.auth import ADMIN_ROLE, ANALYST_ROLE, INGEST_ROLE, SERVICE_ROLE, USER_ROLE, mint_token
from core.clock import ManualClock
from core.outputs import NOTIFICATIONS_OUTPUT, insert_records
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from infra.kafka import launcher
from schemas.notifications import Notification, NotificationType
from tests.api.usage_rows import Event, seed
from tests.conftest import TEST_DATA_DIR
from tests.integration.harness import embedded

METHODS = ("get", "put", "post", "delete", "patch")
ERROR_SCHEMA = schema(ErrorBody)
# who calls: no token, or a token with these roles (an empty tuple acts as `user`)
CALLERS: tuple[tuple[str, ...] | None, ...] = (
    None, (), (USER_ROLE,), (ADMIN_ROLE,), (INGEST_ROLE,), (SERVICE_ROLE,), (ANALYST_ROLE,))
USER = "user-1"
# answers in another shape than the error body, by design: the probe's own body
NOT_ERROR_BODIES = {("get", "/healthz", "503"), ("get", "/readyz", "503")}
NOW_S = float(int(time.time()) // 60 * 60)  # the app's clock: real time, so TTLs keep the rows


@functools.cache
def _document_app() -> FastAPI:
    """An app for its document alone (nothing is opened): made once."""
    return create_app(load(dev=True, data_dir=TEST_DATA_DIR, kafka_bootstrap="127.0.0.1:1"))


def _operations() -> list[tuple[str, str]]:
    paths = _document_app().openapi()["paths"]
    return [(method, path) for path, item in paths.items() for method in item
            if method in METHODS]


OPERATIONS = _operations()


# --- (a) the document -------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    document = _document_app().openapi()
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on an invalid document
    assert document["info"]["description"]
    assert {tag["name"] for tag in document["tags"]} >= {"events", "usage", "sql", "health"}


def _api_routes(routes: Sequence[object], prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """(full path, route) of every APIRoute, through included routers (FastAPI ≥ 0.16x keeps
    an included router as one entry of `app.routes`)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from _api_routes(included.routes, prefix + getattr(context, "prefix", ""))


def test_every_route_is_in_the_document() -> None:
    app = _document_app()
    paths = app.openapi()["paths"]
    routes = [(path, route) for path, route in _api_routes(app.routes) if route.include_in_schema]
    assert len(routes) >= 7  # health (2), system, admin, events, SQL (2), and what came since
    for path, route in routes:
        for method in route.methods - {"HEAD"}:
            assert method.lower() in paths.get(path, {}), f"{method} {path}"


def _error_schemas(operation: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """status → the JSON schemas of its error answers."""
    return {status: [content["schema"] for media, content in answer.get("content", {}).items()
                     if media == "application/json"]
            for status, answer in operation["responses"].items() if status[0] in "45"}


def _is_error_body(found: dict[str, Any]) -> bool:
    """ErrorBody's schema (FastAPI drops `default: null` from the copy in the document)."""
    detail = found.get("properties", {}).get("error", {})
    return (found.get("title") == ERROR_SCHEMA["title"]
            and found.get("required") == ERROR_SCHEMA["required"]
            and set(detail.get("properties", {})) == {"code", "message", "field"}
            and detail.get("required") == ["code", "message"])


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_is_described(method: str, path: str) -> None:
    operation = _document_app().openapi()["paths"][path][method]
    where = f"{method.upper()} {path}"
    assert operation.get("summary"), where
    assert operation.get("description"), where
    successes = {status: answer for status, answer in operation["responses"].items()
                 if status.startswith("2")}
    assert successes, f"{where}: no success answer"
    for status, answer in successes.items():
        if status == "204":  # No Content: an answer without a body, by definition
            assert not answer.get("content"), f"{where} 204: a body"
            continue
        contents = answer.get("content", {})
        assert contents, f"{where} {status}: no content"
        assert any(content.get("schema") for content in contents.values()) or set(contents) - {
            "application/json"}, f"{where} {status}: no schema"
    errors = _error_schemas(operation)
    assert errors, f"{where}: no error documented"
    for status, schemas in errors.items():
        if (method, path, status) in NOT_ERROR_BODIES:
            continue
        for found in schemas:
            assert _is_error_body(found), f"{where} {status}: not the error body"
    if path.startswith(("/v1/", "/clickhouse/")):
        assert operation.get("security"), f"{where}: no security declared"
    if any("HTTPBearer" in requirement for requirement in operation.get("security", ())):
        assert "401" in errors, f"{where}: behind the bearer token without a 401"
    if operation.get("parameters") or operation.get("requestBody"):
        assert {"400", "422"} & set(errors), f"{where}: takes input but documents no 400/422"
    if operation.get("security"):
        assert "403" in errors, f"{where}: behind a token without a 403 (a role it lacks)"
    for parameter in operation.get("parameters", ()):
        name = f"{where} parameter {parameter['name']}"
        assert parameter.get("description"), f"{name}: no description"
        held = parameter.get("schema", {})
        assert any(key in parameter for key in ("example", "examples")) or any(
            key in held for key in ("example", "examples", "enum", "const", "default")), (
            f"{name}: no example")


def test_the_ingest_body_examples_are_valid_events() -> None:
    body = _document_app().openapi()["paths"]["/v1/events"]["post"]["requestBody"]
    content = body["content"]["application/json"]
    examples = content.get("examples", {})
    assert examples, "POST /v1/events has no body example"
    for example in examples.values():
        jsonschema.validate(example["value"], content["schema"])


# --- (b) schemathesis on the running app ------------------------------------------------


@pytest.fixture(scope="module")
def served(kafka: Settings, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[FastAPI, Settings]]:
    """One app for the module: the real engine (migrated, a few days of rows of two users)
    in its own directory, and its own topics on the real broker."""
    path = tmp_path_factory.mktemp("openapi") / "clickhouse"
    app_settings = kafka.model_copy(update={
        "topic_prefix": f"o{uuid.uuid4().hex[:8]}.", "data_dir": path.parent,
        "clickhouse_dsn": f"chdb://{path}"})
    launcher.ensure_topics(app_settings)
    now_ms = int(NOW_S * 1000)
    with embedded(path) as client:
        migrate(client, app_settings)
        seed(client, app_settings.clickhouse_database, [
            Event(f"e{i}", now_ms - i * 7_919_000, ("user-1", "user-2")[i % 2], f"k{i % 3}",
                  ("chat", "embed", "chat")[i % 3], (200, 201, 404, 429, 500)[i % 5],
                  1.5 + i * 3.7, f"/v1/e{i % 4}", tokens_in=i, tokens_out=2 * i,
                  cost_usd=0.001 * i)
            for i in range(60)])
        insert_records(client, NOTIFICATIONS_OUTPUT, app_settings.clickhouse_database, [
            Notification(notification_id=notification_id, user_id=USER, type=NotificationType.INFO,
                         template="announcement", title="Welcome", message="Welcome.",
                         created_at=datetime.fromtimestamp(NOW_S, tz=UTC))
            for notification_id in (EXAMPLE_ID, EXAMPLE_DELETE_ID)])  # the routes' examples
        app = create_app(app_settings, clock=ManualClock(NOW_S))
        app.dependency_overrides[get_clickhouse] = lambda: client
        shared = pytest.MonkeyPatch()  # the audit trail's client (shared_client) is this one
        shared.setitem(clickhouse._shared, app_settings.dsn, client)  # and none is left open
        try:
            yield app, app_settings
        finally:
            shared.undo()
            asgi.shutdown_lifespans()  # schemathesis keeps an app's lifespan open until then
            store = getattr(app.state, "sql_store", None)
            if store is not None:
                store.close()
            launcher.delete_topics(app_settings)


@pytest.fixture(scope="module")
def api_schema(served: tuple[FastAPI, Settings]) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", served[0])


@pytest.fixture(scope="module")
def tokens(served: tuple[FastAPI, Settings]) -> dict[tuple[str, ...], str]:
    _, app_settings = served
    clock = ManualClock(NOW_S)
    return {roles: mint_token(app_settings, USER, roles=roles, ttl_seconds=3600, clock=clock)
            for roles in CALLERS if roles is not None}


# What "matches the document" means here. Not `positive_data_acceptance` (a schema-valid
# request may still be refused): the document cannot say that `to` must follow `from`, nor
# which strings are SQL. Negative requests (schema-invalid) must be refused with a 4xx.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_headers_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]
# Operations that answer a schema-invalid request with success, by design, and why.
ACCEPTS_INVALID = {
    # a batch answers 202 with each invalid event in `rejected` (and its reason): the body's
    # schema documents what a valid event is, not what the batch refuses
    ("post", "/v1/events"),
}


SETTINGS = settings(max_examples=20, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


def _headers(tokens: dict[tuple[str, ...], str], caller: tuple[str, ...] | None
             ) -> dict[str, str]:
    return {} if caller is None else {"Authorization": f"Bearer {tokens[caller]}"}


def _checked(case: Any, client: Any, headers: dict[str, str]) -> int:
    """Send `case`; no 5xx, and the answer as documented. Its status."""
    response = case.call(session=client, headers=headers)
    assert response.status_code < 500, (
        f"{case.as_curl_command(headers)} answered {response.status_code}: "
        f"{response.text[:500]}")
    operation = (case.operation.method.lower(), case.operation.path)
    # A query parameter the route does not declare is ignored, by design (DESIGN §8: a
    # `user_id` parameter never selects another user's rows): not invalid input to refuse.
    unknown = set(case.query or {}) - {parameter.name for parameter in case.operation.query}
    case.validate_response(response, checks=[
        check for check in CHECKS
        if check is not checks.negative_data_rejection
        or (operation not in ACCEPTS_INVALID and not unknown)])
    return int(response.status_code)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_answers_match_the_document(method: str, path: str, api_schema: Any,
                                    tokens: dict[tuple[str, ...], str]) -> None:
    """Generated requests, valid and invalid, from every kind of caller."""
    operation = api_schema[path][method.upper()]
    cases = st.one_of(operation.as_strategy(),
                      operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    client = asgi.get_client(operation.app)

    @SETTINGS
    @given(case=cases, caller=st.sampled_from(CALLERS))
    def run(case: Any, caller: tuple[str, ...] | None) -> None:
        _checked(case, client, _headers(tokens, caller))

    run()


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_the_documented_examples_succeed(method: str, path: str, api_schema: Any,
                                         tokens: dict[tuple[str, ...], str]) -> None:
    """The document's own examples, from every caller: answered as documented, and one of
    them with success (so the success schemas are held against real answers too)."""
    operation = api_schema[path][method.upper()]
    examples = api_schema.get_strategies_from_examples(operation)
    cases = st.one_of(examples) if examples else operation.as_strategy()
    client = asgi.get_client(operation.app)
    statuses: list[int] = []

    @settings(SETTINGS, max_examples=3)
    @given(case=cases)
    def run(case: Any) -> None:
        statuses.extend(_checked(case, client, _headers(tokens, caller)) for caller in CALLERS)

    run()
    assert any(status < 300 for status in statuses), (
        f"{method.upper()} {path}: no documented example succeeds for any caller "
        f"(statuses {sorted(set(statuses))})")

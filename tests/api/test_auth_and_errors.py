"""CurrentUserDep and require_role with the WebSocket's JWT rules; errors as {"error": ...};
msgspec responses described in OpenAPI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import msgspec
import pytest
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.testclient import TestClient

from api import create_app
from api.deps import CurrentUserDep, require_role
from api.errors import APIError
from api.responses import MsgspecResponse, described, schema
from core.auth import Principal
from core.clock import ManualClock
from core.errors import ServiceError
from core.settings import Settings, load


class Echo(msgspec.Struct, frozen=True):
    user_id: str
    roles: list[str]
    size: int = 0


def _probe_router() -> APIRouter:
    """Routes that exercise the dependencies and the error shapes."""
    router = APIRouter(prefix="/probe")

    @router.get("/me", responses=described(Echo))
    def me(user: CurrentUserDep) -> MsgspecResponse:
        return MsgspecResponse(Echo(user.user_id, list(user.roles)))

    @router.get("/analysts")
    def analysts(
        user: Annotated[Principal, Depends(require_role("analyst", "admin"))],
    ) -> MsgspecResponse:
        return MsgspecResponse(Echo(user.user_id, list(user.roles)))

    @router.get("/sized")
    def sized(size: Annotated[int, Query(ge=1, le=10)]) -> MsgspecResponse:
        return MsgspecResponse(Echo("x", [], size))

    @router.get("/conflict")
    def conflict() -> None:
        raise APIError(409, "conflict", "rule r1 changed meanwhile", field="version")

    @router.get("/down")
    def down() -> None:
        msg = "cannot reach ClickHouse at http://ch:8123: refused"
        raise ServiceError(msg)

    @router.get("/bug")
    def bug() -> None:
        msg = "a secret detail"
        raise RuntimeError(msg)

    return router


@pytest.fixture
def probe(api_settings: Settings, clock: ManualClock) -> FastAPI:
    return create_app(api_settings, routers=[_probe_router()], clock=clock)


@pytest.fixture
def probe_client(probe: FastAPI) -> TestClient:
    return TestClient(probe, raise_server_exceptions=False)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_valid_token_names_the_user_and_roles(probe_client: TestClient,
                                                token: Callable[..., str]) -> None:
    response = probe_client.get("/probe/me", headers=_bearer(token("u-7", roles=("admin",))))
    assert response.status_code == 200
    assert response.json() == {"user_id": "u-7", "roles": ["admin"], "size": 0}
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic dTpw"},
                                     {"Authorization": "Bearer"},
                                     {"Authorization": "Bearer x.y.z"}])
def test_a_missing_or_malformed_token_is_401(probe_client: TestClient,
                                             headers: dict[str, str]) -> None:
    response = probe_client.get("/probe/me", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert set(error) == {"code", "message"}


def test_an_expired_token_is_401_by_the_injected_clock(
    probe_client: TestClient, token: Callable[..., str], clock: ManualClock,
    api_settings: Settings,
) -> None:
    issued = token(ttl=60)
    clock.advance(60 + api_settings.jwt_leeway_seconds)
    assert probe_client.get("/probe/me", headers=_bearer(issued)).status_code == 200
    clock.advance(1)
    response = probe_client.get("/probe/me", headers=_bearer(issued))
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "invalid token: expired"


def test_a_token_signed_with_another_secret_is_401(probe_client: TestClient,
                                                   clock: ManualClock) -> None:
    from core.auth import mint_token

    other = load(dev=True, jwt_secret="another-secret-of-at-least-32-characters!")
    response = probe_client.get("/probe/me", headers=_bearer(mint_token(other, "u", clock=clock)))
    assert response.status_code == 401
    assert response.json()["error"]["message"].startswith("invalid token: Signature")


def test_require_role_is_403_without_one_of_the_roles(probe_client: TestClient,
                                                      token: Callable[..., str]) -> None:
    response = probe_client.get("/probe/analysts", headers=_bearer(token(roles=("user",))))
    assert response.status_code == 403
    assert response.json() == {
        "error": {"code": "forbidden", "message": "this needs the admin or analyst role"}}
    for role in ("analyst", "admin"):
        ok = probe_client.get("/probe/analysts", headers=_bearer(token(roles=(role,))))
        assert ok.status_code == 200
    assert probe_client.get("/probe/analysts").status_code == 401  # no token: 401 before 403


def test_errors_share_one_shape(probe_client: TestClient) -> None:
    not_found = probe_client.get("/nowhere")
    assert not_found.status_code == 404
    assert not_found.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    wrong_method = probe_client.post("/healthz")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    invalid = probe_client.get("/probe/sized", params={"size": 11})
    assert invalid.status_code == 422
    assert invalid.json() == {"error": {"code": "invalid_request", "field": "size",
                                        "message": "Input should be less than or equal to 10"}}
    conflict = probe_client.get("/probe/conflict")
    assert conflict.status_code == 409
    assert conflict.json() == {"error": {"code": "conflict", "field": "version",
                                         "message": "rule r1 changed meanwhile"}}
    down = probe_client.get("/probe/down")
    assert down.status_code == 503
    assert down.headers["retry-after"] == "5"
    assert down.json()["error"]["code"] == "unavailable"
    assert "ch:8123" not in down.text
    bug = probe_client.get("/probe/bug")
    assert bug.status_code == 500
    assert bug.json() == {"error": {"code": "internal", "message": "internal error"}}


def test_openapi_describes_msgspec_responses_and_bearer_auth(probe_client: TestClient) -> None:
    document = probe_client.get("/openapi.json").json()
    ok = document["paths"]["/probe/me"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == schema(Echo)
    assert schema(Echo)["properties"]["user_id"] == {"type": "string"}
    assert schema(Echo)["required"] == ["user_id", "roles"]
    tables = document["paths"]["/v1/admin/tables"]["get"]
    items = tables["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    assert items["items"]["items"]["properties"]["rows"] == {"type": "integer"}
    assert "HTTPBearer" in document["components"]["securitySchemes"]
    assert tables["security"] == [{"HTTPBearer": []}]


class Inner(msgspec.Struct):
    n: int


class Outer(msgspec.Struct):
    inner: Inner
    many: list[Inner]


def test_schema_inlines_nested_definitions() -> None:
    found = schema(Outer)
    assert "$defs" not in str(found)
    assert found["properties"]["inner"]["properties"] == {"n": {"type": "integer"}}
    assert found["properties"]["many"]["items"]["title"] == "Inner"


def test_the_api_refuses_a_placeholder_secret_outside_dev() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="KEYPULSE_JWT_SECRET"):
        create_app(load(dev=False, jwt_secret="changeme"))

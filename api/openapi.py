"""The OpenAPI document at `/openapi.json`: FastAPI's, finished with what it cannot know.

`install(app, security_schemes=...)` makes `app.openapi()` answer FastAPI's document with
four repairs, so every answer the API gives is the one the document describes:

- a request FastAPI refuses (422) answers the API's error body (api.errors), not FastAPI's
  `HTTPValidationError`: that schema is replaced everywhere and dropped;
- any operation may answer 500 with the error body (api.errors' last handler): documented;
- an operation behind the bearer token documents its `401` (the token is checked before
  anything else) when the route did not;
- security schemes that no dependency declares (the SQL endpoint's basic auth and
  `X-ClickHouse-Key`) join the components.

Routes still document their own success (api.responses.described) and their own errors
(api.responses.failures); tests/api/test_openapi.py holds every answer against the document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from api.responses import failures

BEARER = "HTTPBearer"  # the scheme name FastAPI gives api.deps' HTTPBearer
_BEARER_SCHEME = {"type": "http", "scheme": "bearer",
                  "description": "a keypulse JWT (`keypulse token --role ...`)"}
_FASTAPI_ERRORS = ("HTTPValidationError", "ValidationError")
_INVALID = "a parameter or the body does not match this document (`field` names it)"
_UNAUTHORIZED = "no valid bearer token (missing, expired, wrong audience or issuer)"
_INTERNAL = "a failure of the server's own (logged there, never bad input)"
METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def install(app: FastAPI, *,
            security_schemes: Mapping[str, dict[str, Any]] | None = None) -> None:
    """Serve the finished document (FastAPI still caches it and rebuilds it when routes
    change)."""
    generate = app.openapi
    finished: list[int] = []  # id() of the last document finished

    def openapi() -> dict[str, Any]:
        document = generate()
        if not finished or finished[0] != id(document):
            finish(document, security_schemes or {})
            finished[:] = [id(document)]
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point


def finish(document: dict[str, Any], security_schemes: Mapping[str, dict[str, Any]]) -> None:
    """The four repairs of the module docstring, in place."""
    components = document.setdefault("components", {})
    schemes = components.setdefault("securitySchemes", {})
    for name, scheme in security_schemes.items():
        schemes.setdefault(name, scheme)
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            responses = operation.setdefault("responses", {})
            if _is_fastapi_validation(responses.get("422")):
                responses["422"] = failures({422: _INVALID})[422]
            secured = any(BEARER in requirement for requirement in operation.get("security", ()))
            if secured and "401" not in responses:
                responses["401"] = failures({401: _UNAUTHORIZED})[401]
                schemes.setdefault(BEARER, _BEARER_SCHEME)
            responses.setdefault("500", failures({500: _INTERNAL})[500])
    schemas = components.get("schemas", {})
    for name in _FASTAPI_ERRORS:
        schemas.pop(name, None)
    if not schemas:
        components.pop("schemas", None)


def _is_fastapi_validation(response: dict[str, Any] | None) -> bool:
    if response is None:
        return False
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))

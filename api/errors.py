"""Every error the API answers is `{"error": {"code", "message", "field"?}}` (DESIGN §8).

    APIError(status, code, message, field=None)   raised by routes and dependencies

`install(app)` registers the handlers: APIError as is; Starlette's HTTP errors (404, 405...)
and FastAPI's request validation (422, with the offending field) in the same shape; an
unreachable ClickHouse or Kafka (core.errors.ServiceError) as 503; anything else as a bare
500 whose detail stays in the server's log.
"""

from __future__ import annotations

import http
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from api.responses import MsgspecResponse
from core.errors import ServiceError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An answer other than success: status, a stable machine code, a human message."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def error_response(exc: APIError) -> MsgspecResponse:
    return MsgspecResponse(error_body(exc.code, exc.message, exc.field), status_code=exc.status,
                           headers=exc.headers)


def _code(status: int) -> str:
    """404 → "not_found": the status phrase, as a code."""
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


async def _api_error(_request: Request, exc: Exception) -> MsgspecResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(_request: Request, exc: Exception) -> MsgspecResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else http.HTTPStatus(exc.status_code).phrase
    return MsgspecResponse(error_body(_code(exc.status_code), message),
                           status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> MsgspecResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    return MsgspecResponse(
        error_body("invalid_request", str(first.get("msg", "invalid request")),
                   ".".join(loc) or None),
        status_code=422,
    )


async def _service_error(_request: Request, exc: Exception) -> MsgspecResponse:
    logger.warning("answering 503: %s", exc)
    return MsgspecResponse(error_body("unavailable", "a backing service is unavailable"),
                           status_code=503, headers={"Retry-After": "5"})


async def _internal_error(request: Request, exc: Exception) -> MsgspecResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return MsgspecResponse(error_body("internal", "internal error"), status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(Exception, _internal_error)

"""JSON answers built from the msgspec contract types (schemas/), described in OpenAPI.

FastAPI serialises what a route returns through pydantic; the contract types are msgspec
Structs, so a route returns `MsgspecResponse(value)` (msgspec.json.encode: fast, and the
same bytes as on Kafka) and declares its shape with `responses=described(Type)`, whose
schema comes from msgspec.json.schema:

    @router.get("/tables", responses=described(TableList))
    def tables(...) -> MsgspecResponse:
        return MsgspecResponse(TableList(items=...))
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import JSONResponse


class MsgspecResponse(JSONResponse):
    """`application/json` encoded by msgspec: Structs, dicts, lists, datetimes..."""

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def schema(kind: Any) -> dict[str, Any]:
    """The JSON schema of a msgspec type, its `$defs` inlined (OpenAPI resolves `$ref`
    against the whole document, not the schema that holds them)."""
    found = msgspec.json.schema(kind)
    defs: dict[str, Any] = found.pop("$defs", {})

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name in seen:  # a recursive type: leave it open
                    return {"type": "object", "title": name}
                return inline(defs[name], (*seen, name))
            return {key: inline(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item, seen) for item in node]
        return node

    result: dict[str, Any] = inline(found, ())
    return result


def described(kind: Any, status: int = 200, description: str = "Success"
              ) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route answering `kind` with `status`."""
    return {status: {"description": description,
                     "content": {"application/json": {"schema": schema(kind)}}}}


class ErrorDetail(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str  # stable and machine-readable: "invalid_request", "forbidden", ...
    message: str  # for a person
    field: str | None = None  # the parameter or body field at fault, when there is one


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error the API answers (DESIGN §8)."""

    error: ErrorDetail


_ERROR_SCHEMA = schema(ErrorBody)
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 1}}}


def failures(described_errors: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route's errors, `{status: when}`, each with the error
    body's schema (and `Retry-After` on 429 and 503):

        responses={**described(Summary), **failures({400: "`to` is not after `from`"})}
    """
    found: dict[int | str, dict[str, Any]] = {}
    for status, when in described_errors.items():
        entry: dict[str, Any] = {
            "description": when,
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        found[status] = entry
    return found

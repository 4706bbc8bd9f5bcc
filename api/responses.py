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

"""`/clickhouse/`: ClickHouse's HTTP interface, read-only, for analysts (DESIGN §8).

curl, clickhouse-connect's HTTP client (`get_client(host, port, username=..., password=<token>,
proxy_path="/clickhouse")`) and other HTTP ClickHouse clients query the live store through it.
As ClickHouse: the query in the `query` parameter, then the body (both: joined); `database`
(default: the keypulse database); `default_format` or the `X-ClickHouse-Format` header
(default TabSeparated); the answer in that format with `X-ClickHouse-Format` and
`Content-Type`; a refusal as text `Code: N. DB::Exception: ...` with a 4xx status and
`X-ClickHouse-Exception-Code`. Every other parameter (a client's settings, `readonly=0`
among them) is ignored: the limits and `readonly=1` come from the server (api.sql).

Auth: an `analyst` or `admin` token as `Authorization: Bearer`, as the password of basic
auth (any user name), or as `X-ClickHouse-Key`; none or invalid → 401, another role → 403
(those two in the API's JSON error shape, before the store is opened).
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse

from api.deps import ClickHouseDep, SettingsDep
from api.errors import APIError
from api.responses import failures
from api.sql import NAME, ReadOnlyStore, SQLError, answer_format, clean
from core.auth import ADMIN_ROLE, ANALYST_ROLE, AuthError, Principal, verify_token
from core.clock import Clock

ROLES = frozenset({ANALYST_ROLE, ADMIN_ROLE})
DEFAULT_FORMAT = "TabSeparated"
MAX_QUERY_BYTES = 1024 * 1024

router = APIRouter(tags=["sql"])
_open_lock = threading.Lock()


def error(status: int, code: int, text: str,
          headers: dict[str, str] | None = None) -> PlainTextResponse:
    return PlainTextResponse(f"Code: {code}. {text}\n", status_code=status,
                             headers={"X-ClickHouse-Exception-Code": str(code), **(headers or {})})


def _credential(request: Request) -> str | None:
    """The token from Bearer, basic auth's password, or X-ClickHouse-Key."""
    authorization = request.headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return request.headers.get("x-clickhouse-key") or None


def analyst(request: Request, settings: SettingsDep) -> Principal:
    token = _credential(request)
    challenge = {"WWW-Authenticate": 'Basic realm="keypulse", charset="UTF-8"'}
    if token is None:
        raise APIError(401, "unauthorized", "an analyst or admin token is required (Bearer, "
                       "basic auth password or X-ClickHouse-Key)", headers=challenge)
    clock: Clock = request.app.state.clock
    try:
        principal = verify_token(settings, token, clock=clock)
    except AuthError as exc:
        raise APIError(401, "unauthorized", str(exc), headers=challenge) from None
    if ROLES.isdisjoint(principal.roles):
        raise APIError(403, "forbidden", "this needs the analyst or admin role")
    return principal


AnalystDep = Annotated[Principal, Depends(analyst)]


def sql_store(request: Request, _caller: AnalystDep, settings: SettingsDep,
              _shared: ClickHouseDep) -> ReadOnlyStore:
    """The app's read-only client, opened on first use after the shared one (and only for
    an authorised caller)."""
    with _open_lock:
        store: ReadOnlyStore | None = getattr(request.app.state, "sql_store", None)
        if store is None:
            store = request.app.state.sql_store = ReadOnlyStore.open(settings)
        return store


StoreDep = Annotated[ReadOnlyStore, Depends(sql_store)]


SUMMARY = "read-only SQL (ClickHouse's HTTP interface)"
EXAMPLE_QUERY = "SELECT service, count() AS requests FROM usage_events GROUP BY service"
# Alternatives to the bearer token (api.openapi adds them to the document's components)
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "ClickHouseBasic": {"type": "http", "scheme": "basic",
                        "description": "any user name; the token as the password"},
    "ClickHouseKey": {"type": "apiKey", "in": "header", "name": "X-ClickHouse-Key",
                      "description": "the token, as ClickHouse's own header"},
}
_TEXT = {"schema": {"type": "string"}}
_REFUSED = {"schema": {"type": "string", "pattern": "^Code: [0-9]+\\. "},
            "example": "Code: 62. DB::Exception: Syntax error: failed at position 1. "
                       "(SYNTAX_ERROR)\n"}
_CODE_HEADER = {"X-ClickHouse-Exception-Code": {"description": "ClickHouse's error code",
                                                "schema": {"type": "string"}}}
_ANSWERED = {"X-ClickHouse-Format": {"description": "the format of the answer",
                                     "schema": {"type": "string"}}}
SQL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the answer in the requested format", "headers": _ANSWERED,
          "content": {"text/tab-separated-values": {**_TEXT, "example": "anthropic\t42\n"},
                      "text/csv": _TEXT, "text/plain": _TEXT, "application/json": {"schema": {}},
                      "application/x-ndjson": _TEXT,
                      "application/octet-stream": _TEXT}},
    **failures({401: "no valid token (Bearer, basic auth password or X-ClickHouse-Key)"}),
    400: {"description": "refused SQL (syntax, a setting, a function outside the read-only "
                         "set) or a bad database/format name", "headers": _CODE_HEADER,
          "content": {"text/plain": _REFUSED}},
    403: {"description": "not an analyst or admin token (JSON), or a write or privileged "
                         "statement refused by the engine (ClickHouse text)",
          "headers": _CODE_HEADER,
          "content": {**failures({403: ""})[403]["content"], "text/plain": _REFUSED}},
    404: {"description": "unknown table or database", "headers": _CODE_HEADER,
          "content": {"text/plain": _REFUSED}},
    413: {"description": "a query over 1 MiB", "headers": _CODE_HEADER,
          "content": {"text/plain": _REFUSED}},
}
_NAME = {"type": "string", "pattern": f"^$|{NAME.pattern}"}  # empty: the default
_PARAMETERS = [
    {"name": "query", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "the SQL; with a body too, this part comes first", "example": EXAMPLE_QUERY},
    {"name": "database", "in": "query", "required": False,
     "schema": _NAME, "example": "keypulse",
     "description": "the database unqualified names refer to (default: keypulse's)"},
    {"name": "default_format", "in": "query", "required": False, "schema": _NAME,
     "description": "the answer's format unless the query ends with FORMAT "
                    "(default TabSeparated)", "example": "JSONEachRow"},
    {"name": "X-ClickHouse-Format", "in": "header", "required": False,
     "schema": _NAME, "description": "as default_format, and wins over it",
     "example": "CSVWithNames"},
]
_SECURITY: list[dict[str, list[str]]] = [
    {"HTTPBearer": []}, {"ClickHouseBasic": []}, {"ClickHouseKey": []}]
_GET_EXTRA: dict[str, Any] = {"parameters": _PARAMETERS, "security": _SECURITY}
_HEAD, _, _REST = EXAMPLE_QUERY.partition(" GROUP BY ")  # POST's example: split in two
_POST_EXTRA: dict[str, Any] = {
    "parameters": [{**_PARAMETERS[0], "example": _HEAD}, *_PARAMETERS[1:]],
    "security": _SECURITY,
    "requestBody": {"required": False, "description": "the SQL (or its rest, after `query`)",
                    "content": {"text/plain": {"schema": {"type": "string"},
                                               "example": f"GROUP BY {_REST}"}}},
}
_DESCRIPTION = (
    "ClickHouse's HTTP interface on the live store, read-only at the engine (no DDL, no "
    "INSERT, no `SET readonly=0`, no file or network table functions), with execution-time "
    "and result-size limits. Other parameters (a client's settings) are ignored. "
    "`analyst` or `admin` token only; curl and clickhouse-connect's HTTP client work as "
    "against a ClickHouse server (`proxy_path=\"/clickhouse\"`).")


@router.get("/clickhouse/", response_class=Response, summary=SUMMARY,
            description=_DESCRIPTION, operation_id="clickhouse_sql_get",
            responses=SQL_RESPONSES, openapi_extra=_GET_EXTRA)
@router.post("/clickhouse/", response_class=Response, summary=SUMMARY,
             description=_DESCRIPTION, operation_id="clickhouse_sql_post",
             responses=SQL_RESPONSES, openapi_extra=_POST_EXTRA)
@router.get("/clickhouse", response_class=Response, include_in_schema=False,
            operation_id="clickhouse_sql_get_bare")  # clickhouse-connect's proxy_path, no slash
@router.post("/clickhouse", response_class=Response, include_in_schema=False,
             operation_id="clickhouse_sql_post_bare")
async def clickhouse(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    params = request.query_params
    body = b""
    if request.method == "POST":
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_QUERY_BYTES:
            return error(413, 1001, "DB::Exception: the query is larger than 1 MiB.")
        body = await request.body()
        if len(body) > MAX_QUERY_BYTES:
            return error(413, 1001, "DB::Exception: the query is larger than 1 MiB.")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return error(400, 62, "DB::Exception: the query is not UTF-8. (SYNTAX_ERROR)")
    query = " ".join(part for part in (params.get("query", ""), text) if part.strip())
    database = params.get("database") or settings.clickhouse_database
    fmt = (request.headers.get("x-clickhouse-format") or params.get("default_format")
           or DEFAULT_FORMAT)
    for name, value in (("database", database), ("format", fmt)):
        if not NAME.match(value):
            return error(400, 81 if name == "database" else 73,
                         f"DB::Exception: invalid {name} name {value[:64]!r}.")
    try:
        answer = await anyio.to_thread.run_sync(store.run, query, database, fmt)
    except SQLError as exc:
        return error(exc.status, exc.code, exc.text)
    answered = answer_format(clean(query), fmt)
    return Response(answer, media_type=_media_type(answered),
                    headers={"X-ClickHouse-Format": answered})


@router.get("/clickhouse/ping", response_class=PlainTextResponse, include_in_schema=False)
def ping() -> str:
    """ClickHouse's liveness answer (clients' `ping()`), unauthenticated as there."""
    return "Ok.\n"


def _media_type(fmt: str) -> str:
    lowered = fmt.lower()
    if lowered.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if lowered.startswith("csv"):
        return "text/csv; charset=UTF-8"
    if lowered.startswith("json") and ("eachrow" in lowered or lowered == "jsonlines"):
        return "application/x-ndjson; charset=UTF-8"  # a JSON value per line, as ClickHouse
    if lowered.startswith("json"):
        return "application/json; charset=UTF-8"
    if lowered in {"pretty", "prettycompact", "vertical", "markdown", "values"}:
        return "text/plain; charset=UTF-8"
    return "application/octet-stream"

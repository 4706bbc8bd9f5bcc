"""The HTTP API (FastAPI). `create_app(settings)` builds it; `keypulse api` serves it alone and
`keypulse run` serves it beside the WebSocket bridge and the pipeline in one process.

Where things go (the skeleton the HTTP API issue fills):

    routes/<resource>.py   one APIRouter each (prefix, tags); plain `def` when it queries
    deps.py                SettingsDep, ClickHouseDep, CurrentUserDep, require_role(...)
    queries.py             the read queries: SQL with server-side parameters, typed rows out
    responses.py           MsgspecResponse (msgspec contract types as JSON) and described(T)
                           (their JSON schema in OpenAPI)
    errors.py              APIError and the handlers: every error is {"error": {...}}

Today: `/healthz` (503 with a reason when a health check fails: the embedded pipeline dead or
stuck), `/metrics`, and the admin routes `/v1/admin/tables`, `/system`, `/audit`.
"""

from api.app import create_app

__all__ = ["create_app"]

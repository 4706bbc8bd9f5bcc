"""The audit trail: one `audit_log` row per change made through the API, written before the
answer (DESIGN §8, schemas/audit.py).

    audit.record(request, client, principal, "alert_rule.update", target=rule_id,
                 user_id=principal.user_id, details={"version": "3"})

A change is answered only once its row is stored: if the trail cannot be written the request
fails with 503 (and the failure is logged), so nothing is changed silently. `details` holds
the change's own, already checked fields as text; never a token or a secret.
`GET /v1/admin/audit` reads it back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client
from fastapi import Request

from api.errors import APIError
from core.auth import Principal
from core.clock import Clock
from core.outputs import AUDIT_OUTPUT, insert_records
from core.settings import Settings
from schemas.audit import AuditRecord

logger = logging.getLogger(__name__)

MAX_TEXT = 256


def entry(request: Request, principal: Principal, action: str, *, target: str = "",
          user_id: str = "", details: Mapping[str, object] | None = None) -> AuditRecord:
    """The audit record of `action` by `principal`, from the request's client and clock."""
    clock: Clock = request.app.state.clock
    client = request.client
    return AuditRecord(
        audit_id=str(uuid.uuid4()),
        at=datetime.fromtimestamp(clock(), tz=UTC),
        actor=principal.user_id[:MAX_TEXT],
        roles=list(principal.roles),
        action=action[:MAX_TEXT],
        target=target[:MAX_TEXT],
        user_id=user_id[:MAX_TEXT],
        remote_addr=(client.host if client is not None else "")[:MAX_TEXT],
        user_agent=request.headers.get("user-agent", "")[:MAX_TEXT],
        details={name: str(value)[:MAX_TEXT] for name, value in (details or {}).items()},
    )


def write(client: Client, settings: Settings, records: list[AuditRecord]) -> None:
    """Stores `records`; 503 (logged) when the engine refuses them. Blocking."""
    try:
        insert_records(client, AUDIT_OUTPUT, settings.clickhouse_database, list(records))
    except Exception:  # clickhouse-connect and chDB raise unrelated types
        logger.exception("audit trail not written (%s records, first %s)", len(records),
                         records[0].action if records else "-")
        raise APIError(503, "unavailable", "the audit trail could not be written; retry",
                       headers={"Retry-After": "1"}) from None


def record(request: Request, client: Client, principal: Principal, action: str, *,
           target: str = "", user_id: str = "",
           details: Mapping[str, object] | None = None) -> AuditRecord:
    """`entry` + `write` on the route's ClickHouse client (ClickHouseDep): the usual
    one-liner in a (sync) route."""
    settings: Settings = request.app.state.settings
    rec = entry(request, principal, action, target=target, user_id=user_id, details=details)
    write(client, settings, [rec])
    return rec

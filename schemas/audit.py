"""The audit trail (table `audit_log`, `GET /v1/admin/audit`): who changed what, when, from
where. One record per change a person or a backend made through the API: alert rules,
announcements, API-key events, admin actions. Never a secret and never a token: `details`
holds the change's own fields, already checked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=256)]


class AuditRecord(msgspec.Struct, kw_only=True, frozen=True):
    audit_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # a fresh UUID
    at: datetime  # when the change was accepted
    actor: Text  # the token's `sub`
    roles: list[str]  # the token's roles at the time
    action: Text  # `<thing>.<verb>`: alert_rule.create, announcement.send, api_key.rotated…
    target: Text = ""  # what was changed: a rule id, an API key id, a notification id
    user_id: Text = ""  # whose data it touched, when one user's ("*" for everyone)
    remote_addr: Text = ""  # the client's address as the server saw it
    user_agent: Text = ""
    details: dict[str, str] = msgspec.field(default_factory=dict)
    schema_version: int = 1

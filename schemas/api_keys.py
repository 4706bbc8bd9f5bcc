"""API-key lifecycle events (topic `apikey.events`, key = user_id; table `api_key_events`).

Two kinds of sender: the key-management backend (`POST /v1/api-keys/events`, role `service`),
whose word is trusted, and a user's own WebSocket client (`api_key_created|updated|deleted`),
which can only declare what it did. `declared_by` says which, so nobody mistakes one for the
other. Metadata only: anything shaped like a secret is refused before it is produced
(core/secrets.py).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ServiceName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
KeyName = Annotated[str, msgspec.Meta(max_length=128)]


class ApiKeyAction(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    ROTATED = "rotated"  # only the backend rotates a key: no client event for it


class DeclaredBy(StrEnum):
    SERVICE = "service"  # the key-management backend (role `service`), over HTTP
    CLIENT = "client"  # the user's own client, over the WebSocket: a claim, not a fact


class ApiKeyEvent(msgspec.Struct, kw_only=True, frozen=True):
    """One API key lifecycle change. `event_id` is its identity: a replay or a retried POST
    with the same id is stored once, and its notification is `apikey:{event_id}`."""

    action: ApiKeyAction
    user_id: Id
    api_key_id: Id
    service: ServiceName
    name: KeyName = ""
    at: datetime
    event_id: Annotated[str, msgspec.Meta(max_length=128)] = ""  # "" only in older messages
    declared_by: DeclaredBy = DeclaredBy.CLIENT
    schema_version: int = 1


def notification_id(event_id: str) -> str:
    """The id of the notification an API-key event makes: derived, so it is stored once."""
    return f"apikey:{event_id}"

"""`POST /v1/api-keys/events` (DESIGN §8): API-key lifecycle events from the key-management
backend (role `service`), whose word is trusted, unlike a user's own client on the WebSocket.

One event becomes, in this order: the `ApiKeyEvent` (`declared_by` "service") on
`apikey.events` and its notification (template `api_key_<action>`, id `apikey:<event_id>`) on
`notifications`, each confirmed by Kafka (the bridge turns them into `api_key_update` and
`new_notification` on the user's sockets, replayed on resume); both rows stored at once
(`notifications`, then `api_key_events`: a stored event means a stored notification); the
audit row; then `202 {event_id, notification_id}`.

`event_id` is the idempotency key: a retry with the same id answers the same ids and is
stored once; once the event is stored, a retry publishes nothing again (an `event_id` reused
for a different event is a 409).

Metadata only. A body holding anything shaped like a secret (a field named like one, a value
shaped like a provider key or a long high-entropy string: core.secrets) is refused with 422
naming the field, never the value: the body is decoded here, not by FastAPI's validation,
so no error message, log line or trace ever carries what was sent.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from api import audit
from api.deps import ClickHouseDep, PublisherDep, SettingsDep, TemplatesDep, require_role
from api.errors import APIError
from api.ingest import EventProducer, read_body, retry_after
from api.responses import MsgspecResponse, described, failures, schema
from core.auth import SERVICE_ROLE, Principal
from core.clock import Clock
from core.outputs import API_KEY_EVENTS_OUTPUT, NOTIFICATIONS_OUTPUT, insert_records
from core.secrets import find_secret, looks_like_secret
from core.settings import Settings
from core.templates import Templates
from core.topics import APIKEY_EVENTS, NOTIFICATIONS
from schemas.api_keys import (
    ApiKeyAction,
    ApiKeyEvent,
    DeclaredBy,
    Id,
    KeyName,
    ServiceName,
    notification_id,
)
from schemas.notifications import SYSTEM_USER, Notification

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])

MAX_BODY_BYTES = 16 * 1024
# `apikey:` + the id must fit a notification id (128)
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=120,
                                      pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]
Instant = Annotated[datetime, msgspec.Meta(tz=True)]


class ApiKeyEventIn(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What the key-management backend declares: metadata of one lifecycle change."""

    user_id: Id  # whose key (never `*`)
    action: ApiKeyAction
    api_key_id: Id  # the key's public id, never its secret
    service: ServiceName
    name: KeyName = ""  # the key's label, shown in the notification
    event_id: EventId | None = None  # the idempotency key; a UUID is made when absent
    at: Instant | None = None  # when it happened (RFC 3339 with an offset); default now


class ApiKeyEventAccepted(msgspec.Struct, frozen=True):
    event_id: str  # the event's id (as sent, or made)
    notification_id: str  # the notification it made: `apikey:<event_id>`


_FIELDS = frozenset(ApiKeyEventIn.__struct_fields__)
_object = msgspec.json.Decoder(dict[str, Any])
_event_in = msgspec.json.Decoder(ApiKeyEventIn)
_AT_PATH = re.compile(r"at `\$\.([A-Za-z0-9_]+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a field name fit to be shown
_RULES = {  # what each field must be, for a 422
    "user_id": "a string of 1-128 characters, not `*`",
    "action": f"one of {', '.join(a.value for a in ApiKeyAction)}",
    "api_key_id": "a string of 1-128 characters: the key's id, never its secret",
    "service": "1-64 characters of a-z, 0-9, `_`, `.`, `-`, starting with a letter or digit",
    "name": "a string of at most 128 characters",
    "event_id": "1-120 characters of A-Z, a-z, 0-9, `_`, `.`, `:`, `-`, starting with a "
                "letter or digit (a UUID, say)",
    "at": "an RFC 3339 time with an offset, e.g. 2026-12-01T12:00:00Z",
}

ServiceDep = Annotated[Principal, Depends(require_role(SERVICE_ROLE))]

_EXAMPLE = {"user_id": "user-42", "action": "rotated", "api_key_id": "key_7f3a",
            "service": "openai", "name": "production",
            "event_id": "3f2b1c4e-9a7d-4e2b-8c1d-0a9b8c7d6e5f"}
_REQUEST_BODY: dict[str, Any] = {"requestBody": {
    "required": True,
    "description": (f"one API-key lifecycle event, at most {MAX_BODY_BYTES} bytes: metadata "
                    "only (a field named or shaped like a secret is refused, 422); unknown "
                    "fields are refused"),
    "content": {"application/json": {"schema": schema(ApiKeyEventIn), "examples": {
        "rotated": {"summary": "a key rotated by the backend", "value": _EXAMPLE},
        "minimal": {"summary": "the required fields only",
                    "value": {"user_id": "user-42", "action": "created",
                              "api_key_id": "key_7f3a", "service": "openai"}}}}},
}}
_ERRORS = failures({
    400: "the body is not JSON",
    401: "no valid bearer token",
    403: "the token does not hold the service role",
    409: "the event_id names another, already stored event",
    413: f"a body over {MAX_BODY_BYTES} bytes",
    415: "a Content-Encoding other than gzip",
    422: "not an event: a missing, unknown or invalid field, or a field named or shaped like "
         "a key secret (code `secret_refused`; the field is named, its value never shown)",
    503: "Kafka did not confirm, or ClickHouse did not store, the event; retry it with the "
         "same event_id (see Retry-After)",
})


@router.post("/events", status_code=202, openapi_extra=_REQUEST_BODY,
             summary="declare an API-key lifecycle event",
             responses={**described(ApiKeyEventAccepted, 202,
                                    "published, stored and audited"), **_ERRORS})
async def post_api_key_event(request: Request, principal: ServiceDep, settings: SettingsDep,
                             producer: PublisherDep, templates: TemplatesDep,
                             client: ClickHouseDep) -> MsgspecResponse:
    """A created, updated, deleted or rotated key of `user_id`: to `apikey.events`, a stored
    notification and `api_key_update` on the user's sockets. Retry with the same `event_id`
    until it answers 202."""
    clock: Clock = request.app.state.clock
    data = parse(await read_body(request, MAX_BODY_BYTES), settings, clock)
    change, note = event_of(data, templates, clock)
    await run_in_threadpool(deliver, request, principal, settings, producer, client,
                            change, note, fresh=data.event_id is None)
    return MsgspecResponse(ApiKeyEventAccepted(change.event_id, note.notification_id),
                           status_code=202)


def parse(body: bytes, settings: Settings, clock: Clock) -> ApiKeyEventIn:
    """The body as an event, or 400/422. Secrets are looked for before anything else, and
    no message built here quotes a value that was sent."""
    try:
        fields = _object.decode(body)
    except msgspec.ValidationError:
        raise APIError(422, "invalid_request", "the body must be a JSON object") from None
    except (msgspec.DecodeError, RecursionError):
        raise APIError(400, "malformed_body", "the body is not JSON") from None
    refuse_secrets(fields)
    try:
        data = _event_in.decode(body)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None
    if data.user_id == SYSTEM_USER:
        raise APIError(422, "invalid_request", "user_id: `*` is not a user", field="user_id")
    if data.at is not None:
        now = datetime.fromtimestamp(clock(), tz=UTC)
        if data.at > now + timedelta(seconds=settings.max_clock_skew_seconds):
            raise APIError(422, "invalid_request", "at: in the future", field="at")
        if data.at < now - timedelta(days=settings.events_ttl_days):
            raise APIError(422, "invalid_request",
                           f"at: older than the {settings.events_ttl_days}-day retention",
                           field="at")
    return data


def refuse_secrets(fields: dict[str, Any]) -> None:
    """422 `secret_refused` naming the first field that is named or shaped like a secret
    (a name that is not a plain identifier is not shown either: it may hold the value)."""
    for name, value in fields.items():
        if looks_like_secret(name):
            raise APIError(422, "secret_refused",
                           "a field name looks like a key secret; send metadata only")
        if find_secret({name: value}, _FIELDS) is not None:
            shown = name if _PLAIN_NAME.match(name) else None
            raise APIError(422, "secret_refused",
                           f"{shown or 'a field'}: looks like a key secret (named or shaped "
                           "like one); send metadata only, never the key itself", field=shown)


def invalid(reason: str) -> APIError:
    """A 422 naming the field msgspec's `reason` is about, with the field's rule: never
    msgspec's own text, which quotes a refused enum value."""
    unknown = _UNKNOWN.search(reason)
    if unknown is not None:  # a name refuse_secrets passed
        name = unknown.group(1) if _PLAIN_NAME.match(unknown.group(1)) else None
        return APIError(422, "invalid_request",
                        f"{name or 'a field'}: unknown field (the event takes "
                        f"{', '.join(sorted(_FIELDS))})", field=name)
    missing = _MISSING.search(reason)
    if missing is not None:
        return APIError(422, "invalid_request", f"{missing.group(1)}: required",
                        field=missing.group(1))
    where = _AT_PATH.search(reason)
    field = where.group(1) if where is not None and where.group(1) in _RULES else None
    if field is None:
        return APIError(422, "invalid_request", "not an API-key event")
    return APIError(422, "invalid_request", f"{field}: {_RULES[field]}", field=field)


def event_of(data: ApiKeyEventIn, templates: Templates,
             clock: Clock) -> tuple[ApiKeyEvent, Notification]:
    """The `apikey.events` message and its notification, with the ids derived from
    `event_id` (made when absent)."""
    event_id = data.event_id or str(uuid.uuid4())
    at = (data.at or datetime.fromtimestamp(clock(), tz=UTC)).astimezone(UTC)
    change = ApiKeyEvent(action=data.action, user_id=data.user_id, api_key_id=data.api_key_id,
                         service=data.service, name=data.name, at=at, event_id=event_id,
                         declared_by=DeclaredBy.SERVICE)
    note = templates.notification(
        f"api_key_{data.action.value}", notification_id=notification_id(event_id),
        user_id=data.user_id, created_at=at,
        fields={"api_key_id": data.api_key_id, "service": data.service,
                "name": data.name or data.api_key_id, "declared_by": DeclaredBy.SERVICE.value})
    return change, note


def deliver(request: Request, principal: Principal, settings: Settings, producer: EventProducer,
            client: Client, change: ApiKeyEvent, note: Notification, *, fresh: bool) -> None:
    """Publish, store and audit (blocking). A retry of a stored event is not published again
    (the user's sockets had it), only stored again (a no-op for the tables) and audited.
    `fresh`: the event_id was made here, so nothing can be stored under it yet."""
    stored = None if fresh else stored_event(client, settings, change)
    if stored is not None and stored != _identity(change):
        raise APIError(409, "conflict",
                       "event_id: already names another event of this user; use a new one",
                       field="event_id")
    if stored is None:
        key = change.user_id.encode()
        for topic, value in ((APIKEY_EVENTS, change), (NOTIFICATIONS, note)):
            failure = producer.send([(key, msgspec.json.encode(value))],
                                    topic=settings.topic(topic))
            if failure is not None:
                logger.warning("api-key event %s answering 503: %s", change.event_id, failure)
                raise APIError(503, "unavailable",
                               "Kafka did not confirm the event; retry with the same event_id",
                               headers=retry_after(settings.ingest_timeout_seconds))
    store(client, settings, change, note)
    audit.record(request, client, principal, f"api_key.{change.action.value}",
                 target=change.api_key_id, user_id=change.user_id,
                 details={"event_id": change.event_id, "service": change.service,
                          "name": change.name, "notification_id": note.notification_id,
                          "repeat": str(stored is not None).lower()})


def _identity(change: ApiKeyEvent) -> tuple[str, ...]:
    """What a retry must repeat (its `at` may differ: it defaults to now)."""
    return (change.action.value, change.api_key_id, change.service, change.name,
            change.declared_by.value)


def stored_event(client: Client, settings: Settings,
                 change: ApiKeyEvent) -> tuple[str, ...] | None:
    """The stored event of this user with this event_id (its identity), or None."""
    table = API_KEY_EVENTS_OUTPUT.qualified_table(settings.clickhouse_database)
    try:
        result = client.query(
            f"SELECT action, api_key_id, service, name, declared_by FROM {table} FINAL "
            "WHERE user_id = {user:String} AND event_id = {event:String} LIMIT 1",
            parameters={"user": change.user_id, "event": change.event_id},
        )
    except Exception:  # clickhouse-connect and chDB raise unrelated types
        logger.exception("api-key event %s: cannot look it up", change.event_id)
        raise APIError(503, "unavailable", "the event store cannot be read; retry",
                       headers={"Retry-After": "1"}) from None
    rows = result.result_rows
    return tuple(str(v) for v in rows[0]) if rows else None


def store(client: Client, settings: Settings, change: ApiKeyEvent, note: Notification) -> None:
    """The notification, then the event (so a stored event means a stored notification)."""
    database = settings.clickhouse_database
    try:
        insert_records(client, NOTIFICATIONS_OUTPUT, database, [note])
        insert_records(client, API_KEY_EVENTS_OUTPUT, database, [change])
    except Exception:  # clickhouse-connect and chDB raise unrelated types
        logger.exception("api-key event %s: not stored", change.event_id)
        raise APIError(503, "unavailable",
                       "the event could not be stored; retry with the same event_id",
                       headers={"Retry-After": "1"}) from None

"""Announcements (admin): a `system_notification` to everyone, kept in everyone's history.

An announcement is one notification with `user_id` "*", made by the template registry
(template `announcement`: fields title, message, type). It is published on `notifications`
keyed "*" (the bridge sends it to every connected socket as `system_notification`) and
stored at once: every user's `GET /v1/notifications` lists it, unread, also a user who was
offline when it went out. Each user's read state and deletion of it are their own.

The audit row (`announcement.send`) is written first: an announcement that cannot be
recorded is not sent. A 503 after it is Kafka not confirming (it did not go out: the trail
names a notification id that no history holds) or the store refusing it after Kafka
confirmed (it went out: the pipeline stores it from the topic). Sending again makes a new
one. The trail is written on the request's ClickHouse client (`ClickHouseDep`), as the rows.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from api import audit, notifications
from api.deps import AdminDep, ClickHouseDep, PublisherDep, SettingsDep, TemplatesDep
from api.responses import MsgspecResponse, described, failures
from core.clock import Clock
from core.outputs import NOTIFICATIONS_OUTPUT
from schemas.notifications import SYSTEM_USER, Notification, NotificationType

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin/announcements", tags=["admin"])

TEMPLATE = "announcement"
ID_PREFIX = "announcement:"


class AnnouncementIn(BaseModel):
    """What an admin announces; any other field is refused."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "title": "Scheduled maintenance",
        "message": "The dashboard is read-only on Saturday from 02:00 to 03:00 UTC.",
        "type": "warning"}]})

    title: Annotated[str, Field(min_length=1, max_length=256, pattern=r"\S",
                                description="the headline (not blank)")]
    message: Annotated[str, Field(min_length=1, max_length=4096, pattern=r"\S",
                                  description="the text (not blank)")]
    type: Annotated[NotificationType, Field(description="how clients show it")] = (
        NotificationType.INFO)


@router.post("", status_code=201, responses={
    **described(Notification, 201, "the announcement as sent and stored (`user_id` \"*\")"),
    **failures({400: "a body that cannot be parsed (not UTF-8 text)",
                422: "a body that is not the announcement's shape: a missing, empty or too "
                     "long `title` or `message`, an unknown `type`, or another field (the "
                     "field says which)",
                401: "no valid bearer token", 403: "the token lacks the admin role",
                503: "Kafka did not confirm, or the store or the audit trail did not take "
                     "it; retry after `Retry-After` seconds"}),
})
def send_announcement(body: AnnouncementIn, admin: AdminDep, request: Request,
                      settings: SettingsDep, client: ClickHouseDep, publisher: PublisherDep,
                      templates: TemplatesDep) -> MsgspecResponse:
    """Sends an announcement to every user: a `system_notification` on every connected
    socket now, and a notification in every user's history (unread until they read it)."""
    clock: Clock = request.app.state.clock
    note = templates.notification(
        TEMPLATE, notification_id=ID_PREFIX + uuid.uuid4().hex, user_id=SYSTEM_USER,
        created_at=datetime.fromtimestamp(clock(), tz=UTC),
        fields={"title": body.title, "message": body.message, "type": body.type.value})
    audit.record(request, client, admin, "announcement.send", target=note.notification_id,
                 user_id=SYSTEM_USER, details={"type": note.type.value, "title": note.title})
    notifications.publish(publisher, client, settings, NOTIFICATIONS_OUTPUT, SYSTEM_USER,
                          [note])
    logger.info("announcement %s sent by %s", note.notification_id, admin.user_id)
    return MsgspecResponse(note, status_code=201)

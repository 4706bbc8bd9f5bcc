"""Notifications (topic `notifications`, table `notifications`) and what users do with them.

The topic carries three kinds of message, told apart by `kind`: a `Notification`, a
`NotificationRead` (someone marked one read or unread: table `notification_reads`) and a
`NotificationDelete` (someone removed one from their own history: `notification_deletes`).
`user_id` "*" is system-wide (an announcement or a provider incident): one row, in every
user's history; each user's read state and deletion of it are that user's own rows.

Every message has a deterministic identity (the notification's id; for a read or a delete,
user, id and `at`), so the pipeline, the API and a replay may all write one and the
ReplacingMergeTree tables keep one copy.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

import msgspec

SYSTEM_USER = "*"


class NotificationType(StrEnum):
    INFO = "info"
    SUCCESS = "success"
    WARNING = "warning"
    ERROR = "error"


class Notification(msgspec.Struct, kw_only=True, frozen=True, tag="notification", tag_field="kind"):
    notification_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    type: NotificationType
    template: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    title: Annotated[str, msgspec.Meta(max_length=256)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    created_at: datetime
    data: dict[str, str] = msgspec.field(default_factory=dict)
    schema_version: int = 1


class NotificationRead(msgspec.Struct, kw_only=True, frozen=True, tag="read", tag_field="kind"):
    notification_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    read: bool
    at: datetime
    schema_version: int = 1


class NotificationDelete(msgspec.Struct, kw_only=True, frozen=True, tag="delete",
                         tag_field="kind"):
    """`user_id` removed the notification from their own history (for a system-wide one,
    from theirs only). Final: a later read-state change does not bring it back."""

    notification_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    at: datetime
    schema_version: int = 1


NotificationMessage = Notification | NotificationRead | NotificationDelete

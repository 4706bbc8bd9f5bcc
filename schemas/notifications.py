"""Notifications (topic `notifications`, table `notifications`) and their read-state changes.

The topic carries two kinds of message, told apart by `kind`: a `Notification` and a
`NotificationRead` (someone marked one read or unread). `user_id` "*" is system-wide.
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


NotificationMessage = Notification | NotificationRead

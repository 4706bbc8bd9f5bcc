"""The notification template registry: what each kind of notification says, as data.

`schemas/notification_templates.json` (or the file `KEYPULSE_NOTIFICATION_TEMPLATES_FILE`
names) maps a template name to its `type`, `title` and `body`, with `{placeholders}` taken
from the template's declared `fields`. `type` is a notification type, or
`{"by": field, "map": {value: type}}` to choose it from a field (an alert's severity).

`load()` validates the whole file once, at start (`ConfigError` naming the template and the
problem): every required template present, every placeholder declared, every type known.
Rendering then cannot fail: a field the caller left out renders empty, and title and body
are cut to the notification's limits.

    templates = load(settings)
    note = templates.notification("api_key_created", notification_id=..., user_id=...,
                                  created_at=..., fields={"service": "openai", ...})
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from core.errors import ConfigError
from schemas.notifications import Notification, NotificationType

REQUIRED = frozenset({
    "alert_firing", "alert_resolved", "usage_threshold", "api_key_created", "api_key_updated",
    "api_key_deleted", "api_key_rotated", "provider_incident", "announcement",
})
TITLE_MAX = 256
BODY_MAX = 4096


class TypeBy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    by: str  # the field whose value picks the type
    map: dict[str, NotificationType]


class Template(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: NotificationType | TypeBy
    title: str
    body: str
    fields: list[str]

    def kind(self, fields: Mapping[str, str]) -> NotificationType:
        if isinstance(self.type, TypeBy):
            return self.type.map.get(fields.get(self.type.by, ""), NotificationType.INFO)
        return self.type


class Templates:
    """The validated registry; `render` and `notification` never fail on a known name."""

    def __init__(self, templates: Mapping[str, Template]) -> None:
        self.templates = dict(templates)

    def __contains__(self, name: str) -> bool:
        return name in self.templates

    def render(self, name: str, fields: Mapping[str, str]) -> tuple[NotificationType, str, str]:
        """(type, title, body) of template `name` with `fields`; KeyError if unknown."""
        template = self.templates[name]
        values = _Blank(fields)
        title = string.Formatter().vformat(template.title, (), values)[:TITLE_MAX]
        body = string.Formatter().vformat(template.body, (), values)[:BODY_MAX]
        return template.kind(fields), title, body

    def notification(self, name: str, *, notification_id: str, user_id: str,
                     created_at: datetime, fields: Mapping[str, str]) -> Notification:
        """A notification made from template `name`; `fields` also become its `data`."""
        kind, title, body = self.render(name, fields)
        return Notification(notification_id=notification_id, user_id=user_id, type=kind,
                            template=name, title=title, message=body, created_at=created_at,
                            data=dict(fields))


class _Blank(dict[str, str]):
    """A field the caller did not give renders as an empty string."""

    def __missing__(self, key: str) -> str:
        return ""


def load(path: Path | None = None) -> Templates:
    """The registry in `path` (default: the packaged one), validated; ConfigError if not."""
    source = path if path is not None else resources.files("schemas") / (
        "notification_templates.json")
    where = str(path) if path is not None else "schemas/notification_templates.json"
    try:
        raw = source.read_bytes()
        templates = msgspec.json.decode(raw, type=dict[str, Template])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        msg = f"notification templates {where}: {exc}"
        raise ConfigError(msg) from None
    missing = sorted(REQUIRED - templates.keys())
    if missing:
        msg = f"notification templates {where}: missing {', '.join(missing)}"
        raise ConfigError(msg)
    for name, template in templates.items():
        problem = _problem(template)
        if problem is not None:
            msg = f"notification templates {where}: {name}: {problem}"
            raise ConfigError(msg)
    return Templates(templates)


def _problem(template: Template) -> str | None:
    declared = set(template.fields)
    if isinstance(template.type, TypeBy) and template.type.by not in declared:
        return f"type chosen by {template.type.by!r}, which is not one of its fields"
    for part, text in (("title", template.title), ("body", template.body)):
        try:
            parsed: list[Any] = list(string.Formatter().parse(text))
        except ValueError as exc:
            return f"{part}: {exc}"
        for _literal, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in declared:
                return f"{part}: placeholder {{{name}}} is not one of its fields"
            if spec or conversion or not name.isidentifier():
                return f"{part}: placeholder {{{name}}} must be a plain field name"
    if not template.title.strip():
        return "an empty title"
    return None

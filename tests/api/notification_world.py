"""The notification tests' world: an app on the real engine and its own topics on the real
broker, a clock, tokens, and helpers to seed notifications and read the topic.

    with served(kafka, tmp_path_factory) as world: ...   one per test module
    world.reset()                                       tables emptied, clock moved on
    note(id, user, seconds_before_now, **changes)       a Notification to seed
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import create_app
from api.deps import get_clickhouse
from core.auth import mint_token
from core.clock import ManualClock
from core.outputs import NOTIFICATIONS_OUTPUT, insert_records
from core.settings import Settings
from core.topics import NOTIFICATIONS
from infra.clickhouse.migrate import migrate
from infra.kafka import launcher
from schemas.notifications import Notification, NotificationMessage, NotificationType
from tests.api.live import read_topic
from tests.integration.harness import embedded

NOW_S = 1_796_083_200.0  # 2026-12-01T00:00:00Z
TABLES = ("notifications", "notification_reads", "notification_deletes", "audit_log")
_messages = msgspec.json.Decoder(NotificationMessage)  # type: ignore[arg-type]


@dataclass
class World:
    app: FastAPI
    http: TestClient
    store: Client
    settings: Settings
    clock: ManualClock

    def reset(self) -> World:
        """Empty tables (the topic keeps the earlier tests' messages: users differ)."""
        for table in TABLES:
            self.store.command(f"TRUNCATE TABLE {self.settings.clickhouse_database}.{table}")
        self.clock.advance(60)
        return self

    def headers(self, user: str, roles: tuple[str, ...] = ()) -> dict[str, str]:
        token = mint_token(self.settings, user, roles=roles, ttl_seconds=3600, clock=self.clock)
        return {"Authorization": f"Bearer {token}"}

    def add(self, *notes: Notification) -> None:
        insert_records(self.store, NOTIFICATIONS_OUTPUT, self.settings.clickhouse_database,
                       list(notes))

    def get(self, user: str, path: str = "", **params: Any) -> Any:
        response = self.http.get(f"/v1/notifications{path}", params=params,
                                 headers=self.headers(user))
        assert response.status_code == 200, response.text
        return response.json()

    def ids(self, user: str, **params: Any) -> list[str]:
        """Every id the user's list holds, page by page (the cursor followed to the end)."""
        found: list[str] = []
        cursor = None
        while True:
            page = self.get(user, **params, **({"cursor": cursor} if cursor else {}))
            found += [item["notification_id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return found

    def unread(self, user: str) -> int:
        count: int = self.get(user, "/unread-count")["unread"]
        return count

    def post(self, user: str, path: str) -> Any:
        return self.http.post(f"/v1/notifications{path}", headers=self.headers(user))

    def delete(self, user: str, notification_id: str) -> Any:
        return self.http.delete(f"/v1/notifications/{notification_id}",
                                headers=self.headers(user))

    def on_topic(self, *keys: str) -> list[tuple[bytes | None, Any]]:
        """(key, decoded message) of the messages on `notifications` keyed by `keys` (the
        topic holds the module's earlier tests' messages too)."""
        wanted = {key.encode() for key in keys}
        return [(key, _messages.decode(value)) for key, value
                in read_topic(self.settings, NOTIFICATIONS)
                if value is not None and key in wanted]


def note(notification_id: str, user: str, seconds: float = 0, **changes: Any) -> Notification:
    """A notification of `user`, created `seconds` before NOW_S."""
    fields: dict[str, Any] = {
        "notification_id": notification_id, "user_id": user, "type": NotificationType.INFO,
        "template": "announcement", "title": f"title {notification_id}",
        "message": f"message {notification_id}",
        "created_at": datetime.fromtimestamp(NOW_S, tz=UTC) - timedelta(seconds=seconds),
        "data": {"title": f"title {notification_id}"}}
    fields.update(changes)
    return Notification(**fields)


def users() -> tuple[str, str]:
    """Two users of this test's own."""
    tag = uuid.uuid4().hex[:6]
    return f"alice-{tag}", f"bob-{tag}"


@contextlib.contextmanager
def served(kafka: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The app on a migrated engine in its own directory and its own topics."""
    path = tmp_path_factory.mktemp("notifications") / "clickhouse"
    settings = kafka.model_copy(update={
        "topic_prefix": f"n{uuid.uuid4().hex[:8]}.", "data_dir": path.parent,
        "clickhouse_dsn": f"chdb://{path}"})
    launcher.ensure_topics(settings)
    clock = ManualClock(NOW_S)
    try:
        with embedded(path) as store:
            migrate(store, settings)
            app = create_app(settings, clock=clock)
            app.dependency_overrides[get_clickhouse] = lambda: store
            with TestClient(app) as http:
                yield World(app, http, store, settings, clock)
    finally:
        launcher.delete_topics(settings)

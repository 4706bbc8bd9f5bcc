"""The WebSocket and HTTP agree on notifications, through one `keypulse run` (the API, the
bridge and the pipeline in one process, its own data directory and topics): reading on one
device updates the others' badges (issue 13, DESIGN §7, §8).

1. A notification read over HTTP reaches both sockets of the user as `notification_read`,
   and `unread-count` drops at once.
2. A notification read on socket 1 (`mark_notification_read`) reaches socket 2, and
   `unread-count` over HTTP once the pipeline has stored the change it took from Kafka.
3. An announcement reaches every connected socket as `system_notification`.
4. A notification deleted over HTTP reaches both sockets as `notification_deleted`.

The notifications are announcements (the API stores them at once), so only step 2's HTTP
half waits on the pipeline (polled with a deadline).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from core.auth import ADMIN_ROLE, mint_token
from core.settings import Settings
from infra.kafka import launcher
from tests.integration.harness import RunProcess
from tests.ws.harness import expect, login, recv, send

pytestmark = pytest.mark.integration

FRAME_TIMEOUT_S = 15.0
PIPELINE_DEADLINE_S = 60.0  # the pipeline stores what the bridge produced: poll up to this


@pytest.fixture(scope="module")
def run(kafka: Settings, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[RunProcess, Settings]]:
    """`keypulse run` on a free port with its own data directory and topic prefix."""
    settings = kafka.model_copy(update={"topic_prefix": f"l{uuid.uuid4().hex[:8]}."})
    launcher.ensure_topics(settings)  # before the bridge starts: it reads from their ends
    process = RunProcess(settings, tmp_path_factory.mktemp("live"))
    process.start()
    try:
        process.wait_healthy()
        yield process, settings
        assert process.stop() == 0
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.kill9()
        launcher.delete_topics(settings)


def http(port: int, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return int(response.status), json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


async def until(ws: ClientConnection, event: str, notification_id: str) -> Any:
    """The data of the first `event` frame about `notification_id` (other frames skipped)."""
    deadline = time.monotonic() + FRAME_TIMEOUT_S
    while True:
        frame, data = await recv(ws, max(0.1, deadline - time.monotonic()))
        if frame.event == event and data.notification_id == notification_id:
            return data


class Scene:
    """One user with two sockets, and an admin, on the served process."""

    def __init__(self, process: RunProcess, settings: Settings) -> None:
        self.port = process.port
        self.url = f"ws://127.0.0.1:{process.port}/ws"
        self.settings = settings
        self.user = f"live-{uuid.uuid4().hex[:8]}"
        self.token = mint_token(settings, self.user)
        self.admin = mint_token(settings, "live-admin", roles=(ADMIN_ROLE,))

    async def sockets(self) -> tuple[ClientConnection, ClientConnection]:
        found = []
        for _ in range(2):
            ws, auth = await login(self.url, self.settings, self.user)
            assert auth.user_id == self.user
            await send(ws, "subscribe", {"channels": ["notifications"]})
            await expect(ws, "subscribed")
            found.append(ws)
        return found[0], found[1]

    async def announce(self, title: str) -> str:
        status, sent = await asyncio.to_thread(
            http, self.port, "POST", "/v1/admin/announcements", self.admin,
            {"title": title, "message": f"{title}: details", "type": "info"})
        assert status == 201, sent
        notification_id: str = sent["notification_id"]
        return notification_id

    async def unread(self) -> int:
        status, body = await asyncio.to_thread(
            http, self.port, "GET", "/v1/notifications/unread-count", self.token)
        assert status == 200, body
        count: int = body["unread"]
        return count

    async def read_over_http(self, notification_id: str) -> Any:
        status, body = await asyncio.to_thread(
            http, self.port, "POST", f"/v1/notifications/{notification_id}/read", self.token)
        assert status == 200, body
        return body

    async def unread_ids(self) -> list[str]:
        status, body = await asyncio.to_thread(
            http, self.port, "GET", "/v1/notifications?unread=true&limit=200", self.token)
        assert status == 200, body
        return [item["notification_id"] for item in body["items"]]


def test_an_announcement_reaches_every_connected_socket(
        run: tuple[RunProcess, Settings]) -> None:
    scene = Scene(*run)

    async def main() -> None:
        ws1, ws2 = await scene.sockets()
        other, _ = await login(scene.url, scene.settings, f"other-{uuid.uuid4().hex[:6]}")
        try:
            notification_id = await scene.announce("Maintenance")
            for ws in (ws1, ws2, other):
                data = await until(ws, "system_notification", notification_id)
                assert data.user_id == "*"
                assert data.title == "Maintenance"
                assert data.template == "announcement"
            assert notification_id in await scene.unread_ids()
        finally:
            for ws in (ws1, ws2, other):
                await ws.close()

    asyncio.run(main())


def test_a_read_over_http_reaches_both_sockets_and_the_count(
        run: tuple[RunProcess, Settings]) -> None:
    scene = Scene(*run)

    async def main() -> None:
        ws1, ws2 = await scene.sockets()
        try:
            notification_id = await scene.announce("Read me over HTTP")
            before = await scene.unread()
            assert before >= 1
            body = await scene.read_over_http(notification_id)
            assert body["read"] is True
            assert await scene.unread() == before - 1  # at once: the API stored it
            for ws in (ws1, ws2):
                data = await until(ws, "notification_read", notification_id)
                assert data.user_id == scene.user
                assert data.read is True
        finally:
            await ws1.close()
            await ws2.close()

    asyncio.run(main())


def test_a_read_on_one_socket_reaches_the_other_socket_and_http(
        run: tuple[RunProcess, Settings]) -> None:
    scene = Scene(*run)

    async def main() -> None:
        ws1, ws2 = await scene.sockets()
        try:
            notification_id = await scene.announce("Read me on a socket")
            await until(ws1, "system_notification", notification_id)
            assert notification_id in await scene.unread_ids()
            await send(ws1, "mark_notification_read",
                       {"notification_id": notification_id, "read": True})
            data = await until(ws2, "notification_read", notification_id)
            assert data.user_id == scene.user
            assert data.read is True

            # PIPELINE-DEPENDENT: the bridge only produced the change to Kafka; HTTP shows it
            # once the pipeline (consuming `notifications`) stored it in notification_reads.
            deadline = time.monotonic() + PIPELINE_DEADLINE_S
            while notification_id in await scene.unread_ids():
                assert time.monotonic() < deadline, (
                    "the pipeline never stored the socket's read-state change "
                    f"(notification_reads) within {PIPELINE_DEADLINE_S:.0f} s")
                await asyncio.sleep(0.3)
        finally:
            await ws1.close()
            await ws2.close()

    asyncio.run(main())


def test_a_delete_over_http_reaches_both_sockets(run: tuple[RunProcess, Settings]) -> None:
    scene = Scene(*run)

    async def main() -> None:
        ws1, ws2 = await scene.sockets()
        try:
            notification_id = await scene.announce("Delete me")
            status, _ = await asyncio.to_thread(
                http, scene.port, "DELETE", f"/v1/notifications/{notification_id}",
                scene.token)
            assert status == 204
            assert notification_id not in await scene.unread_ids()
            for ws in (ws1, ws2):
                data = await until(ws, "notification_deleted", notification_id)
                assert data.user_id == scene.user
        finally:
            await ws1.close()
            await ws2.close()

    asyncio.run(main())

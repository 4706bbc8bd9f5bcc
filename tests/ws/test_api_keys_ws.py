"""API-key events on the sockets (real broker, real engine for the API): the backend's
`POST /v1/api-keys/events` arrives as `api_key_update` (declared_by "service") and its
notification on the owner's sockets only; the client's own `api_key_*` frames are marked
"client"; a missed update is replayed once on resume (a version-1 cursor still resumes);
and a secret sent over HTTP or the WebSocket appears in no answer and no log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api import create_app
from core import clickhouse
from core.auth import mint_token
from core.settings import Settings, load
from infra.clickhouse.migrate import migrate
from tests.api.live import LiveServer
from tests.ws.harness import Server, expect, login, open_ws, quiet, recv, send
from ws_bridge import cursor as cursors

pytestmark = pytest.mark.integration

PATH = "/v1/api-keys/events"
# the test's own clients (websockets logs the frames it sends at DEBUG): not the servers'
CLIENT_LOGGERS = ("websockets.client", "httpx", "httpcore")
SECRET = "sk-proj-Q2x9vLmR7tY4wZ8pA1sD6fG3hJ0kN5bVxC"
ENTROPY_SECRET = "Zq8Xw2Lm9Rt4Yv7Pn3Bk6Hj1Gf5Dc0SaEe"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    from tests.integration.harness import embedded

    path = tmp_path_factory.mktemp("api-keys-ws")
    with embedded(path / "clickhouse") as client:
        migrate(client, load(dev=True, data_dir=path))
        yield client


@pytest.fixture
def live_settings(kafka_settings: Settings, tmp_path: Path, engine: Client,
                  monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's topics, with `engine` as the API's shared ClickHouse client."""
    settings = kafka_settings.model_copy(update={"data_dir": tmp_path})
    monkeypatch.setitem(clickhouse._shared, settings.dsn, engine)
    return settings


@pytest.fixture
def api(live_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(live_settings)) as client:
        yield client


def service_headers(settings: Settings) -> dict[str, str]:
    token = mint_token(settings, "key-backend", roles=("service",), ttl_seconds=600)
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def event(user: str = "alice", **fields: str) -> dict[str, str]:
    return {"user_id": user, "action": "rotated", "api_key_id": "key_7f3a", "service": "openai",
            "name": "production", **fields}


async def post_event(api: TestClient, settings: Settings, body: dict[str, str]) -> str:
    response = await asyncio.to_thread(api.post, PATH, content=json.dumps(body),
                                       headers=service_headers(settings))
    assert response.status_code == 202, response.text
    event_id: str = response.json()["event_id"]
    return event_id


async def frames(ws: Any, count: int) -> dict[str, tuple[Any, Any]]:
    """The next `count` frames by event (their order across topics is arrival order)."""
    seen: dict[str, tuple[Any, Any]] = {}
    for _ in range(count):
        frame, data = await recv(ws, timeout=10)
        seen[frame.event] = (frame, data)
    return seen


def test_service_events_reach_only_the_owner(live_settings: Settings, api: TestClient,
                                             bridges: Callable[..., Server]) -> None:
    server = bridges(live_settings)

    async def main() -> None:
        phone, _ = await login(server.url, live_settings, "alice")
        laptop, _ = await login(server.url, live_settings, "alice")
        bob, _ = await login(server.url, live_settings, "bob")
        event_id = await post_event(api, live_settings, event())
        for ws in (phone, laptop):
            seen = await frames(ws, 2)
            frame, update = seen["api_key_update"]
            assert (update.event_id, update.declared_by, update.action, update.api_key_id) == (
                event_id, "service", "rotated", "key_7f3a")
            assert frame.cursor is not None
            _, note = seen["new_notification"]
            assert (note.notification_id, note.template, note.data["declared_by"]) == (
                f"apikey:{event_id}", "api_key_rotated", "service")
        await quiet(bob, 0.5)
        for ws in (phone, laptop, bob):
            await ws.close()

    asyncio.run(main())


def test_client_declared_events_are_marked_client(live_settings: Settings,
                                                  bridges: Callable[..., Server]) -> None:
    server = bridges(live_settings)

    async def main() -> None:
        phone, _ = await login(server.url, live_settings, "alice")
        laptop, _ = await login(server.url, live_settings, "alice")
        bob, _ = await login(server.url, live_settings, "bob")
        await send(laptop, "api_key_updated", {"api_key_id": "k7", "service": "openai"})
        for ws in (phone, laptop):
            seen = await frames(ws, 2)
            _, update = seen["api_key_update"]
            assert (update.declared_by, update.action, update.api_key_id) == (
                "client", "updated", "k7")
            assert str(uuid.UUID(update.event_id)) == update.event_id
            _, note = seen["new_notification"]
            assert note.notification_id == f"apikey:{update.event_id}"
            assert (note.template, note.title) == ("api_key_updated", "API key updated")
            assert note.data == {"api_key_id": "k7", "service": "openai", "name": "k7",
                                 "declared_by": "client"}
        # only the key-management backend rotates a key
        await send(laptop, "api_key_rotated", {"api_key_id": "k7", "service": "openai"})
        _, error = await expect(laptop, "error")
        assert error.code == "unknown_event"
        await quiet(bob, 0.3)
        await quiet(phone, 0.3)
        for ws in (phone, laptop, bob):
            await ws.close()

    asyncio.run(main())


def test_a_missed_api_key_update_is_replayed_once(live_settings: Settings, api: TestClient,
                                                 bridges: Callable[..., Server]) -> None:
    server = bridges(live_settings)

    async def main() -> None:
        watcher, _ = await login(server.url, live_settings, "alice")  # stays connected
        ws, auth = await login(server.url, live_settings, "alice")
        start = auth.cursor
        assert start.startswith("2.")
        await ws.close()
        event_id = await post_event(api, live_settings, event(action="deleted"))
        await frames(watcher, 2)  # the bridge has routed both: they are history now

        ws, auth = await login(server.url, live_settings, "alice", resume_from=start)
        seen = await frames(ws, 2)
        _, update = seen["api_key_update"]
        assert (update.event_id, update.action, update.declared_by) == (
            event_id, "deleted", "service")
        assert seen["new_notification"][1].notification_id == f"apikey:{event_id}"
        await quiet(ws, 0.5)  # once
        last = max((f.cursor for f, _ in seen.values()), key=lambda c: c.split("."))
        await ws.close()

        # from the last cursor: nothing more
        ws, _ = await login(server.url, live_settings, "alice", resume_from=last)
        await quiet(ws, 0.5)
        await ws.close()
        # a version-1 cursor (no API-key position) still resumes: alerts and notifications
        # replayed, API-key updates from now on only (what it was written under)
        old = cursors.decode(start)
        v1 = (f"1.{old.alerts_partition}.{old.alerts_offset}."
              f"{old.notifications_partition}.{old.notifications_offset}")
        ws, auth = await login(server.url, live_settings, "alice", resume_from=v1)
        assert auth.cursor.startswith("2.")
        _, note = await expect(ws, "new_notification")
        assert note.notification_id == f"apikey:{event_id}"
        await quiet(ws, 0.5)
        for sock in (ws, watcher):
            await sock.close()

    asyncio.run(main())


class _Capture(logging.Handler):
    """Every record, formatted with its traceback, wherever it was logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(CLIENT_LOGGERS):
            self.lines.append(self.format(record))


class _AccessLogged(LiveServer):
    """The API on a real port with uvicorn's access log and debug logging on."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="debug", access_log=True,
                                                    loop="asyncio"))


@contextlib.contextmanager
def capturing() -> Iterator[_Capture]:
    """All log output at DEBUG: the root logger and every logger that does not propagate
    (uvicorn's own). Call it once the servers configured their logging."""
    handler = _Capture()
    loggers = [logging.getLogger(), *(logging.getLogger(name)
                                      for name in list(logging.root.manager.loggerDict))]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        if lg is logging.getLogger() or not lg.propagate:
            lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg, level in saved:
            lg.setLevel(level)
            lg.removeHandler(handler)


def test_a_secret_is_refused_and_never_logged(live_settings: Settings,
                                             bridges: Callable[..., Server]) -> None:
    """Over HTTP (uvicorn's access log on) and the WebSocket, with every logger at DEBUG
    (uvicorn's and the websockets protocol's too: it logs frames at DEBUG)."""
    bridge = bridges(live_settings)
    tokens = (mint_token(live_settings, "key-backend", roles=("service",), ttl_seconds=600),
              mint_token(live_settings, "alice", ttl_seconds=600))
    with _AccessLogged(create_app(live_settings)) as http, capturing() as logs:
        answers = _send_secrets(tokens, http.url, bridge.url)
    assert any(PATH in line and "422" in line for line in logs.lines), logs.lines  # access log
    assert any(line.startswith("uvicorn.error DEBUG") for line in logs.lines)  # servers' debug
    signatures = tuple(token.rsplit(".", 1)[1] for token in tokens)
    for secret in (SECRET, ENTROPY_SECRET, *signatures):
        pieces = (secret, secret[:16], secret[-16:])
        leaked = [line for line in (*logs.lines, *answers) if any(p in line for p in pieces)]
        assert not leaked, leaked


def _send_secrets(tokens: tuple[str, str], http_url: str, ws_url: str) -> list[str]:
    """Every answer, HTTP bodies and WebSocket frames, to secrets sent every way (with
    `tokens`: the service's over HTTP, a user's over the WebSocket)."""
    answers: list[str] = []
    bodies = [event(name=SECRET), event(name=ENTROPY_SECRET), {**event(), "secret": SECRET},
              {**event(), "key": ENTROPY_SECRET}, {**event(), "meta": {"x": [SECRET]}},
              {**event(), SECRET: "x"}, event(api_key_id=SECRET), event(event_id=SECRET)]
    with httpx.Client(base_url=http_url) as client:
        for body in bodies:
            response = client.post(PATH, content=json.dumps(body),
                                   headers={"Authorization": f"Bearer {tokens[0]}",
                                            "Content-Type": "application/json"})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "secret_refused"
            answers.append(response.text)

    async def websocket() -> None:
        ws = await open_ws(ws_url)
        await send(ws, "authenticate", {"token": tokens[1]})
        await expect(ws, "authenticated")
        for data in ({"api_key_id": "k1", "service": "openai", "name": SECRET},
                     {"api_key_id": "k1", "service": "openai", "secret": SECRET},
                     {"api_key_id": ENTROPY_SECRET, "service": "openai"},
                     {"api_key_id": "k1", "service": "openai", "notes": {"k": ENTROPY_SECRET}}):
            await send(ws, "api_key_created", data)
            frame, error = await recv(ws)
            assert (frame.event, error.code) == ("error", "secret_refused")
            answers.append(str(error))
        await ws.close()

    asyncio.run(websocket())
    return answers

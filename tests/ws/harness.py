"""Run a bridge under uvicorn in a thread on an ephemeral port; talk to it with `websockets`."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from core.auth import mint_token
from core.settings import Settings
from schemas.ws import ServerFrame, client_frame, decode_server_frame
from ws_bridge import UVICORN_WS_OPTIONS, Bridge, create_bridge


class ListSink:
    """Collects what the bridge would produce (unit tests without Kafka)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bytes, list[tuple[str, bytes]] | None]] = []

    def produce(self, topic: str, key: bytes, value: bytes,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        self.messages.append((topic, key, value, headers))


class Server:
    """A bridge served by uvicorn in a daemon thread."""

    def __init__(self, bridge: Bridge, **uvicorn_options: Any) -> None:
        self.bridge = bridge
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        options = {**UVICORN_WS_OPTIONS, **uvicorn_options}
        config = uvicorn.Config(bridge.app(), log_level="warning", lifespan="on",
                                access_log=False, loop="asyncio", **options)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(main())

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                msg = "bridge server did not start"
                raise RuntimeError(msg)
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the server's event loop (e.g. inject a dispatch)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)

    def run(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def start_bridge(settings: Settings, **options: Any) -> Server:
    uvicorn_options = options.pop("uvicorn", {})
    return Server(create_bridge(settings, **options), **uvicorn_options).start()


def token(settings: Settings, user: str, *roles: str, ttl: float = 600) -> str:
    return mint_token(settings, user, roles=roles, ttl_seconds=ttl)


async def open_ws(url: str, **kwargs: Any) -> ClientConnection:
    return await connect(url, open_timeout=10, max_size=2**20, compression=None, **kwargs)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> tuple[ServerFrame, Any]:
    text = await asyncio.wait_for(ws.recv(), timeout)
    return decode_server_frame(text)


async def login(url: str, settings: Settings, user: str, *roles: str,
                resume_from: str | None = None) -> tuple[ClientConnection, Any]:
    """A connected, authenticated client and its `authenticated` data."""
    ws = await open_ws(url)
    data: dict[str, Any] = {"token": token(settings, user, *roles)}
    if resume_from is not None:
        data["resume_from"] = resume_from
    await ws.send(client_frame("authenticate", data))
    frame, auth = await recv(ws)
    assert frame.event == "authenticated", frame
    assert frame.seq == 1
    return ws, auth


async def send(ws: ClientConnection, event: str, data: object | None = None) -> None:
    await ws.send(client_frame(event, data))


async def expect(ws: ClientConnection, event: str, timeout: float = 5.0) -> tuple[ServerFrame, Any]:
    frame, data = await recv(ws, timeout)
    assert frame.event == event, (frame.event, data)
    return frame, data


async def quiet(ws: ClientConnection, seconds: float = 0.3) -> None:
    """Assert nothing arrives for `seconds`."""
    try:
        text = await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return
    msg = f"unexpected frame: {text!r}"
    raise AssertionError(msg)


def raw_upgrade(port: int, bearer: str | None = None) -> socket.socket:
    """A raw WebSocket with a tiny receive buffer: upgraded (authenticated by header when
    `bearer` is given), the handshake read, and nothing else read until the test says so."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    auth = f"Authorization: Bearer {bearer}\r\n" if bearer is not None else ""
    sock.sendall((
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{auth}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock

"""The uvicorn pin: the installed uvicorn is one the fast path was tested on, a real server
selects it, and anything else falls back to plain ASGI sends."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

import pytest

from core.settings import Settings
from tests.ws.harness import expect, login, send
from ws_bridge import UVICORN_WS_OPTIONS, uvicorn_fast
from ws_bridge.transport import FRAME_WRITER_EXTENSION, AsgiWriter
from ws_bridge.uvicorn_fast import TESTED, SlimWebSocketProtocol, UvicornFrameWriter


def test_installed_uvicorn_is_in_the_tested_range() -> None:
    installed = version("uvicorn")
    assert uvicorn_fast.supported(), (
        f"uvicorn {installed} is outside {TESTED}: run tests/ws on it, then widen TESTED "
        "(and pyproject's pin) or leave it to the plain-ASGI fallback")
    assert UVICORN_WS_OPTIONS["ws"] is SlimWebSocketProtocol


@pytest.mark.parametrize(("text", "expected"), [
    ("0.54.0", (0, 54, 0)), ("0.55.0rc1", (0, 55, 0)), ("1.2", (1, 2, 0)),
    ("0.36.1.post2", (0, 36, 1)), ("junk", (0, 0, 0)),
])
def test_release(text: str, expected: tuple[int, int, int]) -> None:
    assert uvicorn_fast.release(text) == expected


def test_range_edges() -> None:
    low, high = TESTED
    assert uvicorn_fast.supported(".".join(map(str, low)))
    assert not uvicorn_fast.supported(".".join(map(str, high)))
    assert not uvicorn_fast.supported(f"{high[0]}.{high[1]}.0rc1")  # not yet tested
    assert not uvicorn_fast.supported(f"{low[0]}.{low[1] - 1}.99")


def test_outside_the_range_uvicorns_own_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uvicorn_fast, "supported", lambda uvicorn_version=None: False)
    assert uvicorn_fast.server_protocol() == "websockets-sansio"


@pytest.mark.parametrize(("protocol", "writer"), [
    (SlimWebSocketProtocol, UvicornFrameWriter), ("websockets-sansio", AsgiWriter),
])
def test_real_server_selects_the_writer(unit_settings: Settings, bridges,  # type: ignore[no-untyped-def]
                                        protocol: object, writer: type) -> None:
    server = bridges(unit_settings, kafka=False, uvicorn={"ws": protocol})

    async def main() -> None:
        ws, _ = await login(server.url, unit_settings, "alice")

        async def inspect() -> tuple[object, bool]:
            (conn,) = server.bridge.registry.by_user["alice"]
            extensions = conn.websocket.scope.get("extensions") or {}
            return conn.writer, FRAME_WRITER_EXTENSION in extensions

        chosen, announced = server.run(inspect())
        assert isinstance(chosen, writer)
        assert announced is (writer is UvicornFrameWriter)
        await send(ws, "ping", {"nonce": "n"})
        frame, body = await expect(ws, "pong")
        assert frame.seq == 2 and body.nonce == "n"
        await ws.close()

    asyncio.run(main())

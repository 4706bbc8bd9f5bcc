"""The connection log (`keypulse.ws.connections`): one line per connect, authenticate and
close, with ids, addresses, user, roles, close code, reason, duration and frame counts; never
a token, wherever the client put it (the first frame, `?token=`, `Authorization`, Origin)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.auth import ADMIN_ROLE, mint_token
from core.settings import Settings, load
from tests.ws.harness import Server, open_ws, recv, send, token

LOGGER = "keypulse.ws.connections"
CLOSE = re.compile(r"close conn=(?P<conn>\w+) user=(?P<user>\S+) by=(?P<by>\w+) "
                   r"code=(?P<code>\S+) reason=(?P<reason>.*) duration_s=(?P<duration>[\d.]+) "
                   r"frames_in=(?P<fin>\d+) frames_out=(?P<fout>\d+)$")


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Callable[..., list[str]]:
    """`lines(count)`: the connection log's lines, once there are at least `count`."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    def read(count: int = 0, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r.getMessage() for r in caplog.records if r.name == LOGGER]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    return read


def closes(found: list[str]) -> list[dict[str, str]]:
    return [m.groupdict() for line in found if (m := CLOSE.match(line))]


def test_connect_authenticate_close_with_a_token_in_the_first_frame(
        unit_settings: Settings, bridges: Callable[..., Server],
        lines: Callable[..., list[str]]) -> None:
    server = bridges(unit_settings, kafka=False)
    secret = token(unit_settings, "alice", ADMIN_ROLE)

    async def main() -> str:
        ws = await open_ws(server.url)
        await send(ws, "authenticate", {"token": secret})
        _frame, auth = await recv(ws)
        await send(ws, "ping")
        await recv(ws)
        await ws.close(1000, "bye")
        return str(auth.connection_id)

    connection_id = asyncio.run(main())
    found = lines(3)
    assert len(found) == 3, found
    connect, authenticate, close = found
    assert re.fullmatch(rf'connect conn={connection_id} remote="127\.0\.0\.1:\d+" origin=-',
                        connect), connect
    assert authenticate == (f'authenticate conn={connection_id} user="alice" '
                            f'roles="{ADMIN_ROLE}" reauth=0')
    fields = closes([close])[0]
    assert fields["conn"] == connection_id
    assert (fields["user"], fields["by"], fields["code"], fields["reason"]) == (
        '"alice"', "client", "1000", '"bye"')
    assert (fields["fin"], fields["fout"]) == ("2", "2")  # authenticate, ping; authenticated, pong
    assert 0 <= float(fields["duration"]) < 10
    assert not [line for line in found if secret in line or "eyJ" in line]


def test_a_token_in_the_query_string_is_refused_and_not_logged(
        unit_settings: Settings, bridges: Callable[..., Server],
        lines: Callable[..., list[str]]) -> None:
    server = bridges(unit_settings, kafka=False)
    secret = token(unit_settings, "alice")

    async def main() -> None:
        ws = await open_ws(f"{server.url}?token={secret}")
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

    asyncio.run(main())
    found = lines(2)
    assert closes(found) == [{**closes(found)[0], "by": "server", "code": "4401", "user": "-",
                              "reason": '"tokens in the query string are refused; use the '
                                        'authenticate frame"', "fin": "0", "fout": "0"}]
    assert not [line for line in found if secret in line or "eyJ" in line]


def test_a_bearer_header_authenticates_and_a_server_close_is_logged(
        unit_settings: Settings, bridges: Callable[..., Server],
        lines: Callable[..., list[str]]) -> None:
    """Authorization: Bearer on the upgrade; a bad token then closes 4401 with its reason,
    an expired one too: neither token reaches the log."""
    server = bridges(unit_settings, kafka=False)
    good = token(unit_settings, "bob")
    expired = mint_token(unit_settings, "carol", ttl_seconds=60,
                         clock=lambda: time.time() - 3600)

    async def main() -> None:
        ws = await open_ws(server.url, additional_headers={"Authorization": f"Bearer {good}"})
        frame, _ = await recv(ws)
        assert frame.event == "authenticated"
        await ws.close()
        bad = await open_ws(server.url, additional_headers={"Authorization": f"Bearer {expired}"})
        with pytest.raises(ConnectionClosed):
            await recv(bad)

    asyncio.run(main())
    found = lines(5)
    assert [line.split(" ", 1)[0] for line in found] == [
        "connect", "authenticate", "close", "connect", "close"]
    first, second = closes(found)
    assert (first["user"], first["by"], first["code"]) == ('"bob"', "client", "1000")
    assert (second["user"], second["by"], second["code"]) == ("-", "server", "4401")
    assert "expired" in second["reason"]
    assert not [line for line in found if good in line or expired in line or "eyJ" in line]


def test_what_the_client_wrote_is_quoted_cut_and_never_a_token(
        bridges: Callable[..., Server], lines: Callable[..., list[str]]) -> None:
    settings = load(dev=True, ws_allowed_origins="*", kafka_bootstrap="127.0.0.1:1")
    server = bridges(settings, kafka=False)
    secret = token(settings, "dave")

    async def main() -> None:
        ws = await open_ws(server.url, origin=f"https://{secret}.example",  # type: ignore[arg-type]
                           additional_headers={"Authorization": f"Bearer {secret}"})
        await recv(ws)
        await ws.close(4000, f'token {secret[:40]} "\n' + "x" * 70)  # 123 bytes at most

    asyncio.run(main())
    found = lines(3)
    assert found[0].endswith('origin="https://***.example"'), found[0]
    reason = closes(found)[0]["reason"]
    assert reason.startswith('"token *** \\"\\nxxx'), reason
    assert all("\n" not in line for line in found)
    assert not [line for line in found if secret in line]


def test_a_refused_origin_is_logged_without_a_socket(
        bridges: Callable[..., Server], lines: Callable[..., list[str]]) -> None:
    settings = load(dev=True, ws_allowed_origins="https://app.example",
                    kafka_bootstrap="127.0.0.1:1")
    server = bridges(settings, kafka=False)

    async def main() -> None:
        with pytest.raises(InvalidStatus):
            await open_ws(server.url, origin="https://evil.example")  # type: ignore[arg-type]

    asyncio.run(main())
    found = lines(2)
    assert found[0].endswith('origin="https://evil.example"')
    fields = closes(found)[0]
    assert (fields["by"], fields["code"], fields["reason"]) == (
        "server", "4403", '"origin not allowed"')

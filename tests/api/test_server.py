"""keypulse/server.py: header size and header-read time limits, no token in a log line, dev
mode on loopback only; and the uvicorn releases this was tested on."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.logging import AccessFormatter
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.errors import ConfigError
from core.settings import Settings, load
from keypulse.server import (
    TESTED_UVICORN,
    HeadTimeoutProtocol,
    RedactTokens,
    check_bind,
    is_loopback,
    redact,
    server_config,
)

MB = 1024 * 1024


def test_uvicorn_is_a_release_the_server_seam_was_tested_on() -> None:
    version = tuple(int(part) for part in uvicorn.__version__.split(".")[:3])
    low, high = TESTED_UVICORN
    assert low <= version < high, f"uvicorn {uvicorn.__version__}: re-test keypulse/server.py"
    # What HeadTimeoutProtocol builds on.
    for name in ("connection_made", "data_received", "connection_lost", "on_response_complete",
                 "send_400_response"):
        assert callable(getattr(H11Protocol, name))
    assert "h11_max_incomplete_event_size" in uvicorn.Config.__init__.__code__.co_varnames


@contextlib.contextmanager
def serving(settings: Settings, app: FastAPI) -> Iterator[int]:
    """`app` behind keypulse's uvicorn config on an ephemeral port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(app, settings, host="127.0.0.1", port=port, log_level="warning",
                           lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def limits() -> Settings:
    return load(dev=True, http_max_header_bytes=16 * 1024, http_header_timeout_seconds=0.5)


@pytest.fixture
def port(limits: Settings) -> Iterator[int]:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    with serving(limits, app) as bound:
        yield bound


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _send_until_closed(conn: socket.socket, head: bytes, size: int) -> int:
    """Send `head` then up to `size` header bytes; how many were sent before the server
    closed the connection."""
    sent = 0
    chunk = b"a" * 65536
    try:
        conn.sendall(head)
        while sent < size:
            sent += conn.send(chunk[: size - sent])
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def _read_all(conn: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_normal_request_is_answered(port: int) -> None:
    with _connect(port) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"status":"ok"}')


def test_a_32_mb_header_is_refused_while_it_arrives(port: int) -> None:
    with _connect(port) as conn:
        sent = _send_until_closed(conn, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", 32 * MB)
        answer = _read_all(conn)
    assert not answer.startswith(b"HTTP/1.1 200")
    # Refused with 431 (unless the reset overtook it), long before the 32 MB were in.
    assert answer in (b"", ) or answer.startswith(b"HTTP/1.1 431 ")
    assert sent < 16 * MB


def test_a_header_just_over_the_limit_is_431(port: int, limits: Settings) -> None:
    with _connect(port) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(limits.http_max_header_bytes // 1024 + 1):
            conn.sendall(b"a" * 1024)
            time.sleep(0.001)  # arrives in pieces, as a slow client sends it
        answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_half_sent_huge_headers_are_dropped_not_buffered(port: int) -> None:
    """Ten 20 MB heads that never end: each connection is closed after about the limit,
    so the server never holds what the clients keep sending."""
    conns = [_connect(port) for _ in range(10)]
    try:
        sent = [_send_until_closed(c, b"GET / HTTP/1.1\r\nX-Big: ", 20 * MB) for c in conns]
    finally:
        for conn in conns:
            conn.close()
    assert max(sent) < 16 * MB  # kernel buffers aside, the server stopped reading


def test_a_slow_request_head_is_closed_after_the_timeout(port: int) -> None:
    with _connect(port) as conn:
        started = time.monotonic()
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        while time.monotonic() - started < 5:  # a byte every 100 ms: slowloris
            try:
                conn.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - started
    assert closed
    assert 0.4 < elapsed < 3


def test_a_silent_connection_is_closed_after_the_timeout(port: int) -> None:
    with _connect(port) as conn:
        started = time.monotonic()
        assert _read_all(conn) == b""
        assert time.monotonic() - started < 3


def test_the_next_request_head_on_a_kept_alive_connection_is_timed_too(port: int) -> None:
    with _connect(port) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and never more
        started = time.monotonic()
        assert _read_all(conn) == b""
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(("text", "expected"), [
    ("/ws?token=SECRET", "/ws?token=***"),
    ("/healthz?a=1&token=SECRET&b=2", "/healthz?a=1&token=***&b=2"),
    ("/x?access_token=SECRET#f", "/x?access_token=***#f"),
    ("/x?refresh_token=SECRET", "/x?refresh_token=***"),
    ("Authorization: Bearer SECRET", "Authorization: ***"),
    ("(b'authorization', b'Bearer SECRET')", "(b'authorization', b'***')"),
    ('{"authorization": "Basic SECRET"}', '{"authorization": "***"}'),
    ("sent eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln here", "sent *** here"),
    ("/healthz?page=2", "/healthz?page=2"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_the_access_line_keeps_its_shape_without_the_token() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/healthz?token=SECRET", "1.1", 200), None)
    assert RedactTokens().filter(record)
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s',
                           use_colors=False).format(record)
    assert line == '127.0.0.1:5000 - "GET /healthz?token=*** HTTP/1.1" 200 OK'


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback(host: str) -> None:
    assert is_loopback(host)
    check_bind(load(dev=True), host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "203.0.113.9", "example.com"])
def test_dev_mode_with_the_builtin_secret_refuses_other_binds(host: str) -> None:
    with pytest.raises(ConfigError, match=f"refusing to bind {host}: dev mode"):
        check_bind(load(dev=True), host)
    # With a secret of one's own, dev mode may bind anywhere.
    check_bind(load(dev=True, jwt_secret="x" * 40), host)


def test_every_server_gets_the_h11_protocol_with_the_limits() -> None:
    settings = load(dev=True, http_max_header_bytes=4096, http_header_timeout_seconds=2.5)
    config = server_config(FastAPI(), settings, host="127.0.0.1", port=1)
    config.load()
    protocol = config.http_protocol_class
    assert issubclass(protocol, HeadTimeoutProtocol)
    assert protocol.head_timeout == 2.5
    assert config.h11_max_incomplete_event_size == 4096

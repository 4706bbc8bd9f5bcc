"""How keypulse serves HTTP: every uvicorn-specific detail of `run`, `api` and `ws`, in one place.

`serve(app, settings, host=..., port=...)` runs uvicorn with the limits an unauthenticated
client must not get past:

- headers: uvicorn's h11 protocol with `h11_max_incomplete_event_size` =
  `Settings.http_max_header_bytes`, so a request head larger than that is refused (431, the
  connection closed) while it arrives: a half-sent 20 MB header costs the server at most the
  limit plus one read, never the 20 MB;
- header-read time: uvicorn has no such timeout, so `HeadTimeoutProtocol` (a small subclass of
  uvicorn's `H11Protocol`) closes a connection whose request head is not complete within
  `Settings.http_header_timeout_seconds` (slowloris; a socket that never sends a byte too);
- logs: `RedactTokens` rewrites `token=`, `access_token=` (any `…token=`), `Authorization`
  values, Bearer credentials and JWT-shaped strings to `***` in every record of uvicorn's
  loggers (the access line, and the WebSocket accept line that carries `?token=`);
- dev mode: the built-in JWT secret is public, so a server using it binds only to loopback
  (`check_bind`, a one-line ConfigError otherwise) and says so at start;
- death: `watch` is asked once a second why the server should stop (the embedded pipeline
  died); its answer is logged in one line and `serve` returns 1.

tests/api/test_server.py pins the uvicorn versions this was tested on (`TESTED_UVICORN`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.errors import ConfigError
from core.settings import DEV_JWT_SECRET, Settings

logger = logging.getLogger(__name__)

TESTED_UVICORN = ((0, 52, 1), (0, 55, 0))  # [from, to): tests/api passed on 0.52.1, 0.53.0, 0.54.0
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

Watch = Callable[[], str | None]


# -- header-read timeout ---------------------------------------------------------------


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head takes too long.

    The timer runs from the connection's start, and for each later request on a kept-alive
    connection from the end of the previous response; it stops once h11 has the whole head
    (its peer state leaves IDLE). uvicorn's shorter keep-alive timeout still closes an idle
    connection first. An upgrade to WebSocket hands the transport to another protocol after
    the head: the timer is gone by then.
    """

    head_timeout: float = 10.0  # set per server by `serve` (a subclass per config)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined next request may already be partly buffered: time its head too.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._cancel_head_timer()
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers every malformed request 400; a head over the limit is a 431."""
        buffered = len(self.conn.trailing_data[0])
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and buffered > limit:
            self._refuse(431, b"Request Header Fields Too Large")
            return
        super().send_400_response(msg)

    def _refuse(self, status: int, reason: bytes) -> None:
        body = reason + b"\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closing a connection whose request head took over %.1f s",
                         self.head_timeout)
            self.transport.close()


def http_protocol(settings: Settings) -> type[HeadTimeoutProtocol]:
    """A `HeadTimeoutProtocol` with this server's header-read timeout."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,),
                {"head_timeout": settings.http_header_timeout_seconds})


# -- no token in a log line ------------------------------------------------------------

_SECRETS = (
    (re.compile(r"(?i)(\w*token=)[^&\s\"'#]+"), r"\1***"),
    (re.compile(r"(?i)(authorization[\"']?\s*[:=,]\s*(?:b?[\"'])?)(?:(?:bearer|basic)\s+)?"
                r"[^\s\"',;&)]+"), r"\1***"),
    (re.compile(r"(?i)(bearer\s+)[\w.~+/=-]+"), r"\1***"),
    (re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*"), "***"),  # a JWT wherever it appears
)


def redact(text: str) -> str:
    """`text` with token values, Authorization values and JWTs replaced by `***`."""
    if "oken" not in text and "uthorization" not in text and "earer" not in text and (
            "eyJ" not in text):
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _redact_arg(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("latin-1")).encode("latin-1")
    return value


class RedactTokens(logging.Filter):
    """Rewrites secrets out of a record's message and arguments (keeping the arguments'
    shape: uvicorn's access formatter unpacks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        return True


REDACT_TOKENS = RedactTokens()


def redact_logs() -> None:
    """Install the filter on uvicorn's loggers, and on the root logger's handlers (whatever
    propagates there); idempotent. Call it after uvicorn configured its logging."""
    targets: list[logging.Filterer] = [logging.getLogger(n) for n in UVICORN_LOGGERS]
    targets += logging.getLogger().handlers
    for target in targets:
        if REDACT_TOKENS not in target.filters:
            target.addFilter(REDACT_TOKENS)


# -- dev mode binds to loopback ----------------------------------------------------------


def uses_builtin_secret(settings: Settings) -> bool:
    secret = settings.jwt_secret.get_secret_value()
    return settings.dev and secret in ("", DEV_JWT_SECRET)


def check_bind(settings: Settings, host: str) -> None:
    """ConfigError when dev mode's public built-in secret would be served beyond loopback."""
    if not uses_builtin_secret(settings) or is_loopback(host):
        return
    msg = (f"refusing to bind {host}: dev mode (KEYPULSE_DEV=1) signs with the public built-in "
           "JWT secret; bind 127.0.0.1, or set KEYPULSE_JWT_SECRET")
    raise ConfigError(msg)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# -- serving ------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, asking `watch` once a second whether to stop."""

    def __init__(self, config: uvicorn.Config, watch: Watch | None) -> None:
        super().__init__(config)
        self.watch = watch
        self.failure: str | None = None

    async def on_tick(self, counter: int) -> bool:
        if self.watch is not None and counter % 10 == 0 and self.failure is None:
            reason = self.watch()
            if reason is not None:
                self.failure = reason
                logger.error("%s: stopping the server (exit 1)", reason)
                self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises a SIGINT/SIGTERM once it has shut down, so the process dies by
        the signal (exit -15); for keypulse the signal was a request to stop, and a clean
        stop exits 0 (`serve`'s contract, which supervisors and `make run` rely on)."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def server_config(app: Any, settings: Settings, *, host: str, port: int,
                  **options: Any) -> uvicorn.Config:
    """uvicorn's config with keypulse's limits; `options` are passed on (ws=, backlog=...)."""
    options.setdefault("log_level", settings.log_level.lower())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http_protocol(settings),
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        **options,
    )
    redact_logs()  # after uvicorn.Config: it (re)configures its loggers
    return config


def serve(app: Any, settings: Settings, *, host: str, port: int, watch: Watch | None = None,
          **options: Any) -> int:
    """Serve `app` until SIGINT/SIGTERM (0) or until `watch` names a reason to stop (1)."""
    check_bind(settings, host)
    if uses_builtin_secret(settings):
        logger.warning("dev mode: tokens are signed with the public built-in JWT secret; "
                       "serving on loopback only (set KEYPULSE_JWT_SECRET for anything else)")
    server = _Server(server_config(app, settings, host=host, port=port, **options), watch)
    server.run()
    return 1 if server.failure is not None else 0

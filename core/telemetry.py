"""What an operator watches on every keypulse process: `/healthz`, `/readyz` and `/metrics`.

    telemetry = Telemetry(readiness=[kafka_probe(settings), clickhouse_probe(client)])
    telemetry.exposition(accept)      Prometheus text (or OpenMetrics, if asked), its type
    readiness([*health, *telemetry.readiness]) / health(checks)   the JSON answers
    Endpoints(telemetry, health=...)  the three routes for a server without FastAPI
    serve_http(endpoints, host, port) ...on a small threaded server of its own (the pipeline)
    HttpLatency(app, telemetry)       per-request latency by route template (ASGI middleware)

One `CollectorRegistry` per `Telemetry`, never the library's global default: whoever starts
the process makes it and hands it where it is needed (keypulse/commands). It holds the
library's process collector (CPU seconds, resident and virtual memory, open files: the
standard `process_*` names every dashboard knows), a collector that reads every part
registered in `core.metrics` at scrape time (so the hot paths pay nothing: they bump plain
counters, and the parts' histograms are observed per batch), and, in the API, the HTTP
latency histogram.

Readiness is bounded and cheap: a `Probe` looks at most once per `ttl` seconds (a metadata
request to Kafka, `SELECT 1` to ClickHouse) in a thread of its own, and whoever asks waits at
most `timeout` seconds for the look; a probe every second costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)

from core import metrics
from core.errors import ServiceError
from core.settings import Settings
from core.system import SystemSnapshots

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

logger = logging.getLogger(__name__)

Check = Callable[[], str | None]  # why the process is not healthy (or ready), or None
Kind = Literal["counter", "gauge"]
Described = Mapping[str, tuple[Kind, str]]  # a part's field → (kind, HELP text)

PROBE_TTL_S = 1.5  # a probe's answer is reused this long
PROBE_TIMEOUT_S = 1.0  # whoever asks waits at most this long for a look
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   math.inf)


# -- exposition -----------------------------------------------------------------------------


def families(part: str, values: Mapping[str, object], described: Described, *,
             label: str = "partition") -> Iterator[Metric]:
    """A part's numbers as typed families, `keypulse_<part>_<field>` (a counter's name gets
    `_total`). A dict value (per partition) is one sample per key, labelled `label`; a
    None value (no figure yet) leaves the family without samples."""
    for field, (kind, documentation) in described.items():
        value = values.get(field)
        name = f"keypulse_{part}_{field}"
        labels = [label] if isinstance(value, Mapping) else []
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily(name, documentation, labels=labels) if kind == "counter"
            else GaugeMetricFamily(name, documentation, labels=labels))
        if isinstance(value, Mapping):
            for key, item in sorted(value.items()):
                if isinstance(item, int | float):
                    family.add_metric([str(key)], float(item))
        elif isinstance(value, int | float):
            family.add_metric([], float(value))
        yield family


def untyped(part: str, values: Mapping[str, object]) -> Iterator[Metric]:
    """A part that did not describe itself: each number as `keypulse_<part>_<name>`."""
    for name, value in sorted(values.items()):
        if isinstance(value, int | float):  # bool is an int: True → 1
            yield UnknownMetricFamily(f"keypulse_{part}_{name}",
                                      f"{part}: {name} (undescribed)", value=float(value))


class PartsCollector:
    """Every part registered in `core.metrics`, read when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        for name, part in sorted(metrics.parts().items()):
            try:
                if part.exposition is not None:
                    yield from part.exposition()
                else:
                    yield from untyped(name, part.provider())
            except Exception:  # one broken part must not take the others' figures
                logger.exception("metrics of part %s failed", name)


class Telemetry:
    """One process's Prometheus registry and readiness checks (module docstring)."""

    def __init__(self, *, readiness: Sequence[Check] = (), process_metrics: bool = True
                 ) -> None:
        self.registry = CollectorRegistry()
        if process_metrics:
            ProcessCollector(registry=self.registry)
        self.registry.register(PartsCollector())
        self.readiness = tuple(readiness)
        self.system = SystemSnapshots()  # GET /v1/admin/system and system_stats (core.system)
        self._http: Histogram | None = None
        self._lock = threading.Lock()

    def http_latency(self) -> Histogram:
        """The API's request latency histogram, on this registry (made once)."""
        with self._lock:
            if self._http is None:
                self._http = Histogram(
                    "keypulse_api_request_duration_seconds",
                    "HTTP requests: seconds from the request to the last byte of the answer, "
                    "by method, route template and status class",
                    ("method", "route", "status"), registry=self.registry,
                    buckets=LATENCY_BUCKETS)
            return self._http

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry's text and its content type, in the format `accept` asks for
        (the library's choice: Prometheus text 0.0.4 unless OpenMetrics is asked)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


# -- health and readiness -------------------------------------------------------------------


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    status: Literal["ok", "unhealthy"]
    reason: str | None = None  # why not, when unhealthy: the first failing check's answer


class Readiness(msgspec.Struct, frozen=True, omit_defaults=True):
    status: Literal["ready", "not_ready"]
    reason: str | None = None  # every failing check's answer, joined with "; "


def health(checks: Iterable[Check]) -> Health:
    """`unhealthy` with the first failing check's reason, else `ok`."""
    for check in checks:
        reason = check()
        if reason is not None:
            return Health("unhealthy", reason)
    return Health("ok")


def readiness(checks: Sequence[Check]) -> Readiness:
    """`not_ready` naming every failing check, else `ready`. Probes look in parallel."""
    for check in checks:
        if isinstance(check, Probe):
            check.kick()
    reasons = [reason for reason in (check() for check in checks) if reason is not None]
    if reasons:
        return Readiness("not_ready", "; ".join(reasons))
    return Readiness("ready")


class Probe:
    """A readiness check that looks (`look()` returns, or raises why not) at most once per
    `ttl` seconds, in a daemon thread, and answers within `timeout` seconds: a look still
    running then answers "<name>: no answer within …" (and keeps going; its result is
    used once it ends)."""

    def __init__(self, name: str, look: Callable[[], None], *, ttl: float = PROBE_TTL_S,
                 timeout: float = PROBE_TIMEOUT_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.look = look
        self.ttl = ttl
        self.timeout = timeout
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._result: str | None = None
        self._at = -math.inf
        self._running: threading.Event | None = None

    def kick(self) -> threading.Event | None:
        """Start a look if the last answer is stale; the running look's event, or None."""
        with self._lock:
            if self.monotonic() - self._at < self.ttl:
                return None
            if self._running is None:
                done = self._running = threading.Event()
                threading.Thread(target=self._look, args=(done,), name=f"probe-{self.name}",
                                 daemon=True).start()
            return self._running

    def __call__(self) -> str | None:
        running = self.kick()
        if running is not None and not running.wait(self.timeout):
            return f"{self.name}: no answer within {self.timeout:g} s"
        with self._lock:
            return self._result

    def _look(self, done: threading.Event) -> None:
        try:
            self.look()
            result = None
        except Exception as exc:  # any failure is the answer
            result = f"{self.name}: {first_line(exc)}"
        with self._lock:
            self._result, self._at, self._running = result, self.monotonic(), None
        done.set()


def kafka_probe(settings: Settings, *, timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """Kafka answers a metadata request within `timeout` (one quiet admin client, made on
    the first look and kept)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from core.kafka import admin_config

    clients: list[AdminClient] = []

    def look() -> None:
        if not clients:
            clients.append(AdminClient(admin_config(settings, log_level=0)))
        try:
            clients[0].list_topics(timeout=timeout)
        except KafkaException:
            msg = f"no answer from {settings.kafka_bootstrap} within {timeout:g} s"
            raise ServiceError(msg) from None

    return Probe("kafka", look, timeout=timeout + 0.5)


def clickhouse_probe(client: Callable[[], Client], *, ttl: float = PROBE_TTL_S) -> Probe:
    """`SELECT 1` on the process's shared client (`client()` gives it, or raises why not)."""

    def look() -> None:
        client().command("SELECT 1")

    return Probe("clickhouse", look, ttl=ttl)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# -- the three routes, for a server without FastAPI ----------------------------------------


_json = msgspec.json.Encoder()
JSON = "application/json"


class Endpoints:
    """`/healthz`, `/readyz` and `/metrics` for the bridge's bare ASGI app and the
    pipeline's HTTP server: `answer(path, accept)` → (status, content type, body), or None
    for any other path. The readiness checks are `health` then `telemetry.readiness`."""

    def __init__(self, telemetry: Telemetry, *, health: Sequence[Check] = ()) -> None:
        self.telemetry = telemetry
        self.health = tuple(health)

    def answer(self, path: str, accept: str | None = None, method: str = "GET"
               ) -> tuple[int, str, bytes] | None:
        path = path.split("?", 1)[0]
        if path not in ("/healthz", "/readyz", "/metrics"):
            return None
        if method not in ("GET", "HEAD"):
            return 405, JSON, _json.encode({"error": {
                "code": "method_not_allowed", "message": f"{path} answers GET only"}})
        if path == "/healthz":
            answer = health(self.health)
            return (200 if answer.status == "ok" else 503), JSON, _json.encode(answer)
        if path == "/readyz":
            ready = readiness([*self.health, *self.telemetry.readiness])
            return (200 if ready.status == "ready" else 503), JSON, _json.encode(ready)
        body, content_type = self.telemetry.exposition(accept)
        return 200, content_type, body


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        answer = self.server.endpoints.answer(self.path, self.headers.get("Accept"),
                                              self.command)
        status, content_type, body = answer or (404, "text/plain; charset=utf-8", b"not found")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        super().__init__(address, _Handler)


class HttpServer:
    """`Endpoints` on a threaded HTTP server of the standard library, in daemon threads
    (never the caller's: the pipeline's dataflow keeps its thread)."""

    def __init__(self, endpoints: Endpoints, host: str, port: int) -> None:
        try:
            self.server = _Server((host, port), endpoints)
        except OSError as exc:
            msg = (f"cannot serve /healthz, /readyz and /metrics on {host}:{port}: "
                   f"{exc.strerror or exc}")
            raise ServiceError(msg) from None
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="keypulse-http",
                                       daemon=True)

    def __enter__(self) -> HttpServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- HTTP latency by route (ASGI middleware) -------------------------------------------------

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


class HttpLatency:
    """Observes each HTTP request's latency (to the last byte sent) in
    `telemetry.http_latency()`, labelled by method, the matched route's template (not the
    raw path: `/v1/alert-rules/{rule_id}`; `unmatched` when no route matched) and status
    class (`2xx`…). Pure ASGI; WebSocket and lifespan scopes pass through untouched."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.histogram = telemetry.http_latency()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before the answer started: the server answers 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope.get("method", "")
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            with contextlib.suppress(Exception):  # never let a metric fail a request
                self.histogram.labels(method if method in HTTP_METHODS else "other", route,
                                      f"{status // 100}xx").observe(
                    time.perf_counter() - started)

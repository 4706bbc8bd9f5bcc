"""Fixtures of the browser tests: one `keypulse run` for the module, headless Chromium, pages.

The server is the real thing (tests/integration/harness.RunProcess: pipeline, API and bridge
in one process on a free port, its own data directory and topic prefix on the test broker),
with 2 s windows and 1 s of allowed lateness so final stats reach the page within seconds.
Chromium is Debian's (`chromium` on PATH, or /usr/bin/chromium) driven by Playwright for
Python through its executable path: nothing is downloaded. Without the binary the tests are
skipped, saying so.

Each `page` collects console errors and uncaught exceptions; a test ends by asserting there
were none (`Page.errors`), so "no console errors" is checked everywhere, not in one test.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.auth import ADMIN_ROLE, INGEST_ROLE, mint_token
from core.settings import Settings, load
from infra.kafka import launcher
from tests.integration.harness import RunProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ENV = {"KEYPULSE_WINDOW_SECONDS": "2", "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1"}
DOCS = Path(__file__).resolve().parents[2] / "docs"

if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium binary (looked for `chromium` on PATH and {CHROMIUM}); "
                "install Debian's chromium package to run the browser tests",
                allow_module_level=True)

from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright  # noqa: E402


@dataclass
class Server:
    """The running `keypulse run` and what tests do to it."""

    run: RunProcess
    settings: Settings
    dev: Settings = field(default_factory=lambda: load(dev=True))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.run.port}"

    def token(self, user: str, *roles: str) -> str:
        return mint_token(self.dev, user, roles=roles, ttl_seconds=3600)

    def call(self, method: str, path: str, token: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                raw = response.read()
                return int(response.status), json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return int(exc.code), json.loads(raw) if raw else None

    def send_events(self, user: str, services: dict[str, float], *, count: int,
                    ts_ms: int | None = None, spread_ms: int = 1000, status: int = 200,
                    seed: int = 0) -> None:
        """`count` events of the first service (half as many of the second, …) for `user`
        from `ts_ms` (default now) over `spread_ms`,
        in time order across services (as a client sends them: the pipeline counts an event
        behind its key's watermark as late, in no window); `services` maps a service to its
        median latency in ms. The rate swells and ebbs, latencies are log-normal."""
        rng = random.Random(f"{user}-{seed}-{ts_ms}")
        start = int(time.time() * 1000) if ts_ms is None else ts_ms
        events: list[dict[str, Any]] = []
        for rank, (service, latency) in enumerate(services.items()):
            for i in range(count // (rank + 1)):
                # more events where the sine is high: a load that swells and ebbs
                x = (i + rng.random()) / (count // (rank + 1))
                x = x + 0.08 * math.sin(2 * math.pi * x * 3) / (2 * math.pi)
                events.append({
                    "event_id": uuid.uuid4().hex, "ts": start + int(min(max(x, 0), 1) * spread_ms),
                    "user_id": user, "api_key_id": f"key-{service}", "service": service,
                    "status_code": status if rng.random() > 0.01 else 503,
                    "latency_ms": round(latency * rng.lognormvariate(0, 0.35), 2),
                    "endpoint": "/v1/chat", "method": "POST", "tokens_in": rng.randrange(50, 400),
                    "tokens_out": rng.randrange(20, 200), "cost_usd": 0.002})
        events.sort(key=lambda e: e["ts"])
        ingest = self.token("browser-ingest", INGEST_ROLE)
        for first in range(0, len(events), 1000):
            batch = events[first:first + 1000]
            status_, answer = self.call("POST", "/v1/events", ingest, batch)
            assert status_ == 202 and answer["accepted"] == len(batch), answer

    def admin(self) -> str:
        return self.token("browser-admin", ADMIN_ROLE)


@pytest.fixture(scope="module")
def server(kafka: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `keypulse run` for the module, on its own topics; stopped (and the topics
    deleted) at the end, whatever happened."""
    settings = kafka.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:8]}."})
    launcher.ensure_topics(settings)
    run = RunProcess(settings, tmp_path_factory.mktemp("browser"), 1.0, **ENV)
    run.start()
    try:
        run.wait_healthy()
        yield Server(run, settings)
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.stop()
        launcher.delete_topics(settings)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


class Pages:
    """Pages of one test; each records console errors and uncaught exceptions."""

    def __init__(self, browser: Browser, server: Server) -> None:
        self.browser = browser
        self.server = server
        self.errors: list[str] = []
        self.allowed: list[str] = []  # substrings of errors a test expects (a server restart)
        self.contexts: list[Any] = []

    def open(self, *, width: int = 1280, height: int = 860, dark: bool = False) -> Page:
        context = self.browser.new_context(viewport={"width": width, "height": height},
                                           color_scheme="dark" if dark else "light")
        self.contexts.append(context)
        return self.tab(context)

    def tab(self, context: Any) -> Page:
        page: Page = context.new_page()

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(f"console: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.set_default_timeout(20_000)
        return page

    def sign_in(self, page: Page, user: str, role: str = "user") -> None:
        """The dev sign-in, as a person does it: the form, a user id, a role."""
        page.goto(self.server.url + "/")
        page.locator("#dev-user").fill(user)
        page.locator("#dev-form select[name=role]").select_option(role)
        page.get_by_role("button", name="Sign in").first.click()
        page.locator("#app").wait_for(state="visible")

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser, server: Server) -> Iterator[Pages]:
    opened = Pages(browser, server)
    try:
        yield opened
    finally:
        opened.close()


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.2)

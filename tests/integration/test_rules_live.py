"""A rule created over HTTP reaches the live pipeline through the real broker and fires.

One `keypulse run` (API + pipeline, 2 s windows, 1 s lateness): `POST /v1/alert-rules` puts
the rule on `alert.rules`; breaching events go in over `POST /v1/events`, dated in a window of
their own, followed by one event dated past that window + the lateness, which moves the
watermark so the window closes at once (event time: no waiting for windows). The rule fires
on the first such window the pipeline closes with the rule in its book, and the alert is in
`GET /v1/alerts`. The rule travels on another topic than the events, so a window may close
before the rule arrives: each round uses a fresh window, 20 s of event time after the last.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from core.auth import mint_token
from core.settings import Settings, load
from tests.integration.harness import RunProcess

pytestmark = pytest.mark.integration

ENV = {"KEYPULSE_WINDOW_SECONDS": "2", "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1"}
WINDOW_MS, LATENESS_MS = 2_000, 1_000
USER = "rules-live"
RULE = {"name": "payments failing", "metric": "server_error_rate", "op": ">=",
        "threshold": 0.5, "service": "payments", "for_windows": 1, "min_requests": 5,
        "severity": "critical"}


def call(port: int, method: str, path: str, token: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                 **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            raw = response.read()
            return int(response.status), json.loads(raw) if raw else None, response.headers
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null"), exc.headers


def round_events(round_no: int, window_ms: int) -> list[dict[str, Any]]:
    """Ten server errors of `payments` in the window, then one request of another service
    dated past the window's end + the lateness: it closes the window."""
    base = {"user_id": USER, "api_key_id": "key-1", "latency_ms": 12.5, "endpoint": "/pay"}
    breaching = [{**base, "event_id": f"r{round_no}-{i}", "ts": window_ms + i * 100,
                  "service": "payments", "status_code": 500} for i in range(10)]
    tick = {**base, "event_id": f"r{round_no}-tick", "service": "ticker", "status_code": 200,
            "ts": window_ms + WINDOW_MS + LATENESS_MS + 500}
    return [*breaching, tick]


def test_a_rule_created_over_http_fires_on_the_next_breaching_window(
        kafka_settings: Settings, tmp_path: Path) -> None:
    run = RunProcess(kafka_settings, tmp_path, **ENV)
    run.start()
    try:
        run.wait_healthy()
        token = mint_token(load(dev=True), USER)
        status, rule, headers = call(run.port, "POST", "/v1/alert-rules", token, RULE)
        assert status == 201, rule
        assert headers["ETag"] == '"1"'
        status, listed, _ = call(run.port, "GET", "/v1/alert-rules", token)
        assert status == 200
        assert rule["rule_id"] in {item["rule_id"] for item in listed["items"]}

        now_ms = int(time.time() * 1000)
        first_window = now_ms - 60_000 - now_ms % WINDOW_MS
        fired = None
        windows = []
        for round_no in range(6):
            window_ms = first_window + round_no * 20_000
            windows.append(window_ms)
            status, answer, _ = call(run.port, "POST", "/v1/events", token,
                                     round_events(round_no, window_ms))
            assert status == 202 and answer["rejected"] == [], answer
            deadline = time.monotonic() + 8
            while fired is None and time.monotonic() < deadline:
                run.assert_alive()
                status, page, _ = call(run.port, "GET", "/v1/alerts?state=firing", token)
                assert status == 200, page
                fired = next((item for item in page["items"]
                              if item["rule_id"] == rule["rule_id"]), None)
                time.sleep(0.2)
            if fired is not None:
                break
        assert fired is not None, "the rule never fired:\n" + run.log.read_text()[-3000:]
        assert (fired["state"], fired["service"], fired["metric"], fired["severity"],
                fired["value"], fired["rule_name"]) == (
            "firing", "payments", "server_error_rate", "critical", 1.0, "payments failing")
        start = datetime.fromisoformat(fired["window_start"].replace("Z", "+00:00"))
        assert round(start.timestamp() * 1000) == windows[-1], (fired, windows)

        # Switched off over HTTP: the pipeline takes the new version from the topic.
        status, off, headers = call(run.port, "PUT", f"/v1/alert-rules/{rule['rule_id']}",
                                    token, {**RULE, "enabled": False}, {"If-Match": '"1"'})
        assert status == 200 and off["version"] == 2 and headers["ETag"] == '"2"'
        status, _, _ = call(run.port, "DELETE", f"/v1/alert-rules/{rule['rule_id']}", token,
                            headers={"If-Match": '"2"'})
        assert status == 204
        assert run.stop() == 0
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.kill9()

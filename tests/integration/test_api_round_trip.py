"""Ingest → Kafka → pipeline → ClickHouse → analytics routes, through one `keypulse run`.

Events go in over `POST /v1/events` with an ingest token and come back out of
`/v1/usage/summary`, `timeseries` (the 1 m rollups), `breakdown` and `events` with each user's
own token: counts exact, percentiles within 1 % of the nearest-rank value over the events sent,
and nobody sees anybody else's.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from core.auth import INGEST_ROLE, mint_token
from core.settings import Settings, load
from tests.integration.harness import RunProcess
from tests.integration.truth import quantile

pytestmark = pytest.mark.integration

ENV = {"KEYPULSE_WINDOW_SECONDS": "2", "KEYPULSE_ALLOWED_LATENESS_SECONDS": "1"}
USERS = ("rt-alice", "rt-bob")
SERVICES = ("openai", "stripe")
KEYS = ("key-1", "key-2", "key-3")


def request(port: int, method: str, path: str, token: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                 **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


def make_events(now_ms: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(12)
    start = now_ms - 150_000 - now_ms % 60_000  # whole minutes, well before the watermark
    events = []
    for i in range(count):
        status = rng.choice((200, 200, 200, 201, 302, 404, 429, 500, 503))
        events.append({
            "event_id": f"rt-{i}", "ts": start + rng.randrange(0, 120_000),
            "user_id": rng.choice(USERS), "api_key_id": rng.choice(KEYS),
            "service": rng.choice(SERVICES), "status_code": status,
            "latency_ms": round(rng.lognormvariate(4, 0.8), 3),
            "tokens_in": rng.randrange(0, 500), "tokens_out": rng.randrange(0, 900),
            "cost_usd": round(rng.random() / 100, 6), "endpoint": "/v1/chat",
        })
    return sorted(events, key=lambda e: e["ts"])  # as a service sends them: in time order


def close_to(value: float | None, exact: float) -> bool:
    return value is not None and abs(value - exact) <= 0.01 * exact


def test_events_posted_over_http_come_back_exact_from_the_analytics_routes(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    run = RunProcess(kafka_settings, tmp_path, **ENV)
    run.start()
    try:
        run.wait_healthy()
        dev = load(dev=True)
        ingest = mint_token(dev, "rt-ingest", roles=(INGEST_ROLE,))
        tokens = {user: mint_token(dev, user) for user in USERS}
        now_ms = int(time.time() * 1000)
        events = make_events(now_ms, 3000)
        for first in range(0, len(events), 500):
            body = gzip.compress(json.dumps(events[first:first + 500]).encode())
            status, answer = request(run.port, "POST", "/v1/events", ingest, body,
                                     {"Content-Encoding": "gzip"})
            assert status == 202, answer
            assert answer == {"accepted": 500, "rejected": []}
        # The same batch again: the pipeline deduplicates by event_id.
        status, _ = request(run.port, "POST", "/v1/events", ingest,
                            json.dumps(events[:500]).encode())
        assert status == 202

        span = f"from={now_ms - 600_000}&to={now_ms}"
        mine = {user: [e for e in events if e["user_id"] == user] for user in USERS}
        deadline = time.monotonic() + 90
        for user in USERS:
            while True:
                run.assert_alive()
                status, summary = request(run.port, "GET", f"/v1/usage/summary?{span}",
                                          tokens[user])
                assert status == 200, summary
                if summary["requests"] == len(mine[user]) or time.monotonic() > deadline:
                    break
                time.sleep(0.3)

        for user in USERS:
            own = mine[user]
            latencies = [e["latency_ms"] for e in own]
            status, summary = request(run.port, "GET", f"/v1/usage/summary?{span}", tokens[user])
            assert status == 200
            assert summary["requests"] == len(own)
            assert summary["successes"] == sum(e["status_code"] < 400 for e in own)
            assert summary["server_errors"] == sum(e["status_code"] >= 500 for e in own)
            assert summary["tokens_in"] == sum(e["tokens_in"] for e in own)
            assert summary["tokens_out"] == sum(e["tokens_out"] for e in own)
            assert math.isclose(summary["cost_usd"], sum(e["cost_usd"] for e in own),
                                rel_tol=1e-9)
            assert summary["latency_max_ms"] == max(latencies)
            for q, name in ((0.5, "latency_p50_ms"), (0.95, "latency_p95_ms"),
                            (0.99, "latency_p99_ms")):
                assert close_to(summary[name], quantile(latencies, q)), (name, summary[name])

            # The 1 m series reads the rollups: per minute, exactly the events of the minute.
            # A minute's rollup is recomputed within seconds of its windows (docs/analytics.md);
            # these windows were all stored moments ago, out of a backlog.
            per_minute = dict(Counter(e["ts"] - e["ts"] % 60_000 for e in own))
            settle = time.monotonic() + 30
            while True:
                status, series = request(run.port, "GET",
                                         f"/v1/usage/timeseries?{span}&interval=1m", tokens[user])
                assert status == 200, series
                got = {_ms(point["time"]): point["requests"] for point in series["points"]
                       if point["requests"]}
                if got == per_minute or time.monotonic() > settle:
                    break
                time.sleep(0.5)
            assert got == per_minute

            # Breakdown by API key comes from the raw events.
            status, breakdown = request(run.port, "GET",
                                        f"/v1/usage/breakdown?{span}&by=api_key", tokens[user])
            assert status == 200, breakdown
            by_key: dict[str, int] = defaultdict(int)
            for e in own:
                by_key[e["api_key_id"]] += 1
            assert {row["group"]: row["requests"] for row in breakdown["rows"]} == by_key

            # The raw events, newest first, page by page: each once, only the user's own.
            seen: list[str] = []
            cursor = ""
            while True:
                path = f"/v1/usage/events?{span}&limit=700" + (f"&cursor={cursor}" if cursor
                                                                else "")
                status, page = request(run.port, "GET", path, tokens[user])
                assert status == 200, page
                seen.extend(item["event_id"] for item in page["items"])
                assert all(item["user_id"] == user for item in page["items"])
                if page["next_cursor"] is None:
                    break
                cursor = page["next_cursor"]
            assert sorted(seen) == sorted(e["event_id"] for e in own)
        assert run.stop() == 0
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.kill9()


def _ms(value: Any) -> int:
    """A point's time: epoch ms or RFC 3339."""
    if isinstance(value, int | float):
        return int(value)
    from datetime import datetime

    return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1000)

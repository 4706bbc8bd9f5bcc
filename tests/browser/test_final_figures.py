"""The live tier's promise end to end, in a real browser (issue 14): the charts move within
2 s of traffic starting, and the figures the page then shows as final for the window equal
the API's for the same user, service and window, and the burst that was sent.

The server is this module's own `keypulse run` (tests/browser/conftest.py: 2 s windows, 1 s of
allowed lateness), so its only traffic is this file's. A user with no history sends one
burst of known figures for two services, all inside one 2 s window: the dashboard's 10 s
bucket of each service then holds exactly that window, whose final record (exact
percentiles) the page draws, while the API reads the same window's latency sketch (±0.5 %).
The latencies are chosen so that this half percent never shows at the page's rounding, and the
test checks that choice before it relies on it.

The page's figures are read from the legend's `data-*` attributes (api/web/usage.js: the
newest bucket with requests, per service, as drawn), the charts' `aria-label`s and the KPI
cards; everything the page displays is compared through the page's own formatting
(`fmt` of api/web/dom.js), so "equal at the display rounding" means what a person sees.
"""

from __future__ import annotations

import math
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from playwright.sync_api import Page

from core import sketch
from core.auth import INGEST_ROLE
from tests.browser.conftest import Pages, Server, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.browser]

WINDOW_MS = 2_000  # conftest.ENV: KEYPULSE_WINDOW_SECONDS
BUCKET_MS = 10_000  # the dashboard's step for the 1 h range (api/web/usage.js RANGES)
MOVE_WITHIN_MS = 2_000  # issue 14: the charts move within 2 s of traffic starting
FINAL_WITHIN_S = 90.0  # window + lateness + pipeline + store; a page refetch heals within 60 s


@dataclass(frozen=True)
class Burst:
    """One service's events, field by field (the truth the page and the API are held to)."""

    service: str
    statuses: list[int]
    latencies: list[float]
    tokens_in: list[int]
    tokens_out: list[int]
    cost_each: float

    @property
    def requests(self) -> int:
        return len(self.statuses)

    @property
    def successes(self) -> int:
        return sum(s < 400 for s in self.statuses)

    @property
    def client_errors(self) -> int:
        return sum(400 <= s < 500 for s in self.statuses)

    @property
    def server_errors(self) -> int:
        return sum(s >= 500 for s in self.statuses)

    @property
    def tokens(self) -> int:
        return sum(self.tokens_in) + sum(self.tokens_out)

    @property
    def cost(self) -> float:
        return self.cost_each * self.requests


def nearest_rank(values: list[float], q: float) -> float:
    """The exact nearest-rank quantile: what a window's final record carries."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def sketched(values: list[float], q: float) -> float | None:
    """The quantile read from the values' latency sketch: what the API answers."""
    keys, counts = sketch.bins_of_sorted(sorted(values))
    return sketch.quantile(keys, counts, q, max(values))


# openai: 35 successes, 3 client and 2 server errors; p95 is the 38th of 40 latencies (300),
# p99 the largest (490: the sketch is capped by the exact maximum).
OPENAI = Burst(
    service="openai",
    statuses=[429 if i in (7, 19, 31) else 503 if i in (13, 37) else 200 for i in range(40)],
    latencies=[100.0 + 5 * i for i in range(37)] + [300.0, 420.0, 490.0],
    tokens_in=[100 + i for i in range(40)], tokens_out=[50 + i for i in range(40)],
    cost_each=0.0025)
# stripe: all 20 succeed; p95 is the 19th of 20 (140), p99 the largest (145).
STRIPE = Burst(
    service="stripe", statuses=[200] * 20,
    latencies=[50.0 + 4 * i for i in range(18)] + [140.0, 145.0],
    tokens_in=[30] * 20, tokens_out=[10] * 20, cost_each=0.001)
BURSTS = (OPENAI, STRIPE)

FORMAT = """async (pairs) => {
  const { fmt } = await import("/web/dom.js");
  return pairs.map(([how, value]) => fmt[how](value));
}"""


def shown(page: Page, how: str, *values: float | None) -> list[str]:
    """`values` as the page displays them (its own `fmt.<how>`)."""
    return list(page.evaluate(FORMAT, [[how, v] for v in values]))


def burst_start_ms() -> int:
    """A time for the burst whose 2 s window has at least 1.5 s to run: the events (all within
    100 ms of it) share one window, and a slow hand-over cannot make one of them late."""
    now = int(time.time() * 1000)
    start = now - now % WINDOW_MS
    return now if now - start <= 400 else start + WINDOW_MS


def events_of(user: str, start_ms: int) -> list[dict[str, Any]]:
    """The bursts as usage events, in time order, 2 ms apart within each service."""
    events = []
    for burst in BURSTS:
        for i, status in enumerate(burst.statuses):
            events.append({
                "event_id": f"{user}-{burst.service}-{i}", "ts": start_ms + 2 * i,
                "user_id": user, "api_key_id": f"key-{burst.service}",
                "service": burst.service, "status_code": status,
                "latency_ms": burst.latencies[i], "endpoint": "/v1/chat", "method": "POST",
                "tokens_in": burst.tokens_in[i], "tokens_out": burst.tokens_out[i],
                "cost_usd": burst.cost_each})
    events.sort(key=lambda e: (e["ts"], e["service"]))
    return events


WATCH = """() => {  // the wall time at which the legend first shows figures (the charts moved)
  window.__movedAt = null;
  const legend = document.querySelector("#legend");
  const seen = () => {
    if (window.__movedAt === null && legend.querySelector("[data-requests]")) {
      window.__movedAt = Date.now();
    }
  };
  new MutationObserver(seen).observe(legend, { subtree: true, childList: true, attributes: true });
}"""


SNAPSHOT = """() => ({  // what the usage view shows, read in one turn (no redraw in between)
  legend: [...document.querySelectorAll("#legend .legend-item")].map((i) => ({ ...i.dataset })),
  kpis: Object.fromEntries([...document.querySelectorAll("#kpis .kpi")].map((kpi) =>
    [kpi.querySelector(".kpi-label").textContent, kpi.querySelector(".kpi-value").textContent])),
  success: document.querySelector("#chart-success").getAttribute("aria-label"),
  latency: document.querySelector("#chart-latency").getAttribute("aria-label"),
  busy: document.querySelector("#usage").getAttribute("aria-busy"),
})"""


@dataclass(frozen=True)
class View:
    """The usage view at one moment: per service the legend's figures (api/web/usage.js
    renderLegend: the newest bucket with requests), the KPI cards, the charts' labels."""

    legend: dict[str, dict[str, str]]
    kpis: dict[str, str]
    success: str
    latency: str
    busy: bool


def view(page: Page) -> View:
    got = page.evaluate(SNAPSHOT)
    return View(legend={i["service"]: i for i in got["legend"] if "requests" in i},
                kpis=got["kpis"], success=got["success"] or "", latency=got["latency"] or "",
                busy=got["busy"] == "true")


def finals_shown(page: Page, requests: str) -> View | None:
    """The view once every burst's bucket is final and complete, and the Requests card shows
    `requests` (a refetch racing a final record can count a window twice until the next one:
    api/web/usage.js loadUsage)."""
    now = view(page)
    done = all(now.legend.get(b.service, {}).get("provisional") == "false"
               and now.legend[b.service]["requests"] == str(b.requests) for b in BURSTS)
    return now if done and now.kpis.get("Requests") == requests else None


def iso(ms: int) -> str:
    """As the API and the page's `toISOString()` write a time."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def api_point(server: Server, token: str, burst: Burst, bucket_ms: int) -> dict[str, Any] | None:
    """The API's 10 s bucket of the burst's service at `bucket_ms`, once it holds the burst."""
    query = urllib.parse.urlencode({"from": bucket_ms, "to": bucket_ms + BUCKET_MS,
                                    "interval": "10s", "service": burst.service})
    status, answer = server.call("GET", f"/v1/usage/timeseries?{query}", token)
    assert status == 200, answer
    points = answer["points"]
    assert len(points) <= 1 and all(p["time"] == iso(bucket_ms) for p in points), points
    return dict(points[0]) if points and points[0]["requests"] == burst.requests else None


def test_final_figures_on_the_page_equal_the_apis_and_the_burst(server: Server,
                                                                 pages: Pages) -> None:
    user = f"erin-{uuid.uuid4().hex[:6]}"
    page = pages.open()
    pages.sign_in(page, user)
    wait_for(lambda: page.locator("#status").get_attribute("data-state") == "connected",
             what="the socket")
    wait_for(lambda: not view(page).busy, what="the first (empty) load")
    assert view(page).legend == {}, "a new user has no figures yet"
    # The burst's latencies are chosen so that the sketch's ±0.5 % does not show.
    for burst in BURSTS:
        for q in (0.95, 0.99):
            exact, read = nearest_rank(burst.latencies, q), sketched(burst.latencies, q)
            assert shown(page, "ms", exact) == shown(page, "ms", read), (burst.service, q)
    every = [v for b in BURSTS for v in b.latencies]
    assert shown(page, "ms", nearest_rank(every, 0.95)) == shown(page, "ms", sketched(every, 0.95))

    # 1. The live tier: the charts move within 2 s of the traffic starting.
    page.evaluate(WATCH)
    start_ms = burst_start_ms()
    events = events_of(user, start_ms)
    sent_ms = time.time() * 1000
    status, answer = server.call("POST", "/v1/events", server.token("final-ingest", INGEST_ROLE),
                                 events)
    assert status == 202 and answer["accepted"] == len(events), answer
    moved_ms = wait_for(lambda: page.evaluate("window.__movedAt"), timeout=30,
                        what="the first provisional figures")
    took = moved_ms - sent_ms
    assert took < MOVE_WITHIN_MS, f"the charts moved {took:.0f} ms after the traffic started"
    assert int(page.locator("#chart-rps").get_attribute("data-points") or 0) >= 1

    # 2. The window closes; its final records replace the provisional figures.
    total = sum(b.requests for b in BURSTS)
    ok = sum(b.successes for b in BURSTS)
    requests = shown(page, "int", total)[0]
    final = wait_for(lambda: finals_shown(page, requests), timeout=FINAL_WITHIN_S,
                     what="the final figures of both services")
    bucket_ms = start_ms - start_ms % BUCKET_MS

    # 3. The API's figures for the same user, service and window, with the page's own token.
    token = page.evaluate("sessionStorage.getItem('keypulse.token')")
    assert token and token.count(".") == 2
    points: dict[str, dict[str, Any]] = {}
    for burst in BURSTS:
        def stored(burst: Burst = burst) -> dict[str, Any] | None:
            return api_point(server, token, burst, bucket_ms)
        points[burst.service] = wait_for(stored, timeout=30,
                                         what=f"the API's {burst.service} window")
    for burst in BURSTS:
        mine, api = final.legend[burst.service], points[burst.service]
        assert mine["bucket"] == iso(bucket_ms)
        # Counts: exactly, three ways.
        assert int(mine["requests"]) == api["requests"] == burst.requests
        assert int(mine["successes"]) == api["successes"] == burst.successes
        assert int(mine["tokens"]) == api["tokens_in"] + api["tokens_out"] == burst.tokens
        assert (api["client_errors"], api["server_errors"]) == (burst.client_errors,
                                                                burst.server_errors)
        # Rates, latencies and cost: as the page displays them.
        rate = shown(page, "pct", int(mine["successes"]) / int(mine["requests"]),
                     api["success_rate"], burst.successes / burst.requests)
        assert len(set(rate)) == 1, (burst.service, rate)
        for q, key in ((0.95, "p95"), (0.99, "p99")):
            ms = shown(page, "ms", float(mine[key]), api[f"latency_{key}_ms"],
                       nearest_rank(burst.latencies, q))
            assert len(set(ms)) == 1, (burst.service, key, ms)
            # The chart says the same to a screen reader, as final.
            assert f"{burst.service} {key} {ms[0]}," in final.latency + ",", final.latency
        usd = shown(page, "usd", float(mine["cost"]), api["cost_usd"], burst.cost)
        assert len(set(usd)) == 1, (burst.service, usd)
        assert f"{burst.service} {rate[0]}," in final.success + ",", final.success
    assert "(provisional)" not in final.success + final.latency

    # The KPI cards: the range holds only the burst, so its totals are the burst's.
    kpis = final.kpis
    assert kpis["Success rate"] == shown(page, "pct", ok / total)[0]
    assert kpis["Tokens"] == shown(page, "compact", sum(b.tokens for b in BURSTS))[0]
    assert kpis["Cost"] == shown(page, "usd", sum(b.cost for b in BURSTS))[0]

    # 4. A reload from the API (the range again) shows the same figures, and the table too.
    status, summary = server.call("GET", f"/v1/usage/summary?from={bucket_ms}", token)
    assert status == 200 and summary["requests"] == total, summary
    page.locator("#ranges button[data-range='1h']").click()  # sets aria-busy before it returns
    rows = page.locator("#services-body tr")
    wait_for(lambda: not view(page).busy, what="the reload")
    after = view(page)
    assert rows.count() == len(BURSTS)
    for burst in BURSTS:
        mine, again = final.legend[burst.service], after.legend[burst.service]
        for key in ("bucket", "requests", "successes", "tokens", "provisional"):
            assert again[key] == mine[key], (burst.service, key, again, mine)
        for how, key in (("ms", "p95"), ("ms", "p99"), ("usd", "cost")):
            assert shown(page, how, float(again[key])) == shown(page, how, float(mine[key]))
    kpis = after.kpis
    assert kpis["Requests"] == shown(page, "int", summary["requests"])[0] == final.kpis[
        "Requests"]
    assert kpis["Latency p95"] == shown(page, "ms", summary["latency_p95_ms"])[0] == shown(
        page, "ms", nearest_rank(every, 0.95))[0]
    assert kpis["Latency p99"] == shown(page, "ms", summary["latency_p99_ms"])[0] == shown(
        page, "ms", nearest_rank(every, 0.99))[0]
    server_errors = sum(b.server_errors for b in BURSTS)
    assert summary["server_errors"] == server_errors
    assert f"{server_errors} server errors in range" in page.locator("#kpis").inner_text()
    for burst, row in zip(BURSTS, rows.all(), strict=True):
        cells = row.locator("th, td").all_inner_texts()
        api = points[burst.service]
        assert cells == [
            burst.service, *shown(page, "int", api["requests"]),
            *shown(page, "pct", api["success_rate"]),
            *shown(page, "ms", api["latency_p95_ms"], api["latency_p99_ms"]),
            *shown(page, "compact", burst.tokens), *shown(page, "usd", burst.cost)], cells
    assert pages.unexpected_errors() == []

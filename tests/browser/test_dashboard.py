"""The dashboard in a real browser (headless Chromium) against a real `keypulse run`.

One server for the module (tests/browser/conftest.py); the tests run in file order and share
its data: Alice (openai, stripe) and Bob (twilio) send events over `POST /v1/events`, history
first, then live. The server restart comes last.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import DOCS, Pages, Server, wait_for
from tests.integration.harness import produce

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ALICE = f"alice-{uuid.uuid4().hex[:6]}"
BOB = f"bob-{uuid.uuid4().hex[:6]}"
CAROL = f"carol-{uuid.uuid4().hex[:6]}"  # no traffic: no alert notification races the bell
ALICE_SERVICES = {"openai": 300.0, "stripe": 120.0}
BOB_SERVICES = {"twilio": 80.0}


@pytest.fixture(scope="module", autouse=True)
def history(server: Server) -> None:
    """A few minutes of both users' traffic before any page opens: the charts' history."""
    start = int(time.time() * 1000) - 8 * 60_000
    server.send_events(ALICE, ALICE_SERVICES, count=900, ts_ms=start, spread_ms=8 * 60_000 - 5000)
    server.send_events(BOB, BOB_SERVICES, count=300, ts_ms=start, spread_ms=8 * 60_000 - 5000)


def points(page: Page, chart: str) -> int:
    return int(page.locator(f"#{chart}").get_attribute("data-points") or 0)


def no_horizontal_scroll(page: Page) -> bool:
    return bool(page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"))


def test_headers_of_the_page_and_its_files(server: Server, pages: Pages) -> None:
    page = pages.open()
    response = page.goto(server.url + "/")
    assert response is not None and response.status == 200
    headers = response.headers
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    js = page.request.get(server.url + "/web/app.js")
    assert js.headers["content-type"] == "text/javascript; charset=utf-8"
    again = page.request.get(server.url + "/web/app.js",
                             headers={"If-None-Match": js.headers["etag"]})
    assert again.status == 304
    assert page.request.get(server.url + "/web/nope.js").status == 404
    assert page.request.get(server.url + "/web/__init__.py").status == 404
    assert pages.unexpected_errors() == []


CLIENT_SCRIPT = """async () => {
  const { KeypulseClient, backoffDelay } = await import("/web/keypulse-client.js");
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const sockets = [];
  class FakeSocket {  // the bridge's side, played by the test
    constructor(url) {
      this.url = url; this.readyState = 0; this.sent = []; sockets.push(this);
      setTimeout(() => { this.readyState = 1; this.onopen(); }, 0);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() { this.readyState = 3; }
    frame(event, data, extra = {}) {
      this.onmessage({ data: JSON.stringify({ event, data, ts: 1, seq: 1, ...extra }) });
    }
    drop(code) { this.readyState = 3; this.onclose({ code }); }
  }
  const client = new KeypulseClient({
    url: "ws://bridge/ws", token: () => "T", WebSocket: FakeSocket, channels: ["activity"],
    random: () => 0.5, backoff: { initialMs: 100, maxMs: 400 }, pingEveryMs: 0 });
  const states = [];
  const alerts = [];
  client.on("state", (s) => states.push(s.state + (s.reason ? ":" + s.reason : "")));
  client.on("usage_alert", (a, frame) => alerts.push(frame.cursor));
  client.connect();
  await sleep(10);
  const hello = (id, cursor) => ({ user_id: "u", roles: [], connection_id: id, cursor,
                                   expires_at: 0 });
  sockets[0].frame("authenticated", hello("c", "C0"));
  sockets[0].frame("usage_alert", { alert_id: "a" }, { cursor: "C1" });
  sockets[0].drop(1006);
  await sleep(250);
  sockets[1].frame("authenticated", hello("d", "C9"));
  const cursorAfterResume = client.cursor;
  sockets[1].drop(4401);
  await sleep(600);
  return { first: sockets[0].sent, second: sockets[1].sent, sockets: sockets.length, states, alerts,
           cursorAfterResume, ceilings: [1, 2, 3, 4, 5, 6, 7].map((n) =>
             backoffDelay(n, { initialMs: 500, maxMs: 10000, factor: 2 }, () => 0.999999)) };
}"""


def test_the_client_library_resumes_backs_off_and_stops_when_refused(
        server: Server, pages: Pages) -> None:
    page = pages.open()
    page.goto(server.url + "/")
    got = page.evaluate(CLIENT_SCRIPT)
    # The token goes in the first frame, never in the URL; the channels after authentication.
    assert got["first"][0] == {"event": "authenticate", "data": {"token": "T"}}
    assert got["first"][1] == {"event": "subscribe", "data": {"channels": ["activity"]}}
    # The reconnect resumes from the last cursor received (an alert's), not the first one,
    # and a resumed session's `authenticated.cursor` does not move it.
    assert got["second"][0] == {"event": "authenticate",
                                "data": {"token": "T", "resume_from": "C1"}}
    assert got["cursorAfterResume"] == "C1"
    assert got["alerts"] == ["C1"]
    # 4401: no third socket, offline with the reason.
    assert got["sockets"] == 2
    assert got["states"] == ["connecting", "connected", "reconnecting", "connected",
                             "offline:unauthorized"]
    # Full jitter under a ceiling that doubles from 0.5 s up to 10 s.
    assert got["ceilings"] == [500, 1000, 2000, 4000, 8000, 10000, 10000]
    assert pages.unexpected_errors() == []


def test_dev_sign_in_lists_demo_users_and_connects(server: Server, pages: Pages) -> None:
    page = pages.open()
    page.goto(server.url + "/")
    expect(page.locator("#dev-form")).to_be_visible()
    # The demo users are the ones with traffic in the last hour, busiest first.
    expect(page.locator("#dev-users")).to_contain_text(ALICE)
    page.locator("#dev-users button", has_text=ALICE).click()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#who-user")).to_have_text(ALICE)
    token = page.evaluate("sessionStorage.getItem('keypulse.token')")
    assert token and token.count(".") == 2
    assert page.evaluate("localStorage.length") == 0
    assert token not in page.url
    # Signing out forgets the token.
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('keypulse.token')") is None
    assert pages.unexpected_errors() == []


def test_charts_load_history_then_move_with_final_stats(server: Server, pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, ALICE)
    page.locator("#ranges button[data-range='15m']").click()
    wait_for(lambda: points(page, "chart-rps") >= 6, what="history points")
    expect(page.locator("#services-body")).to_contain_text("openai")
    expect(page.locator("#services-body")).to_contain_text("stripe")
    before = page.locator("#kpis .kpi-value").first.inner_text()
    final_before = page.locator("#freshness").inner_text()
    server.send_events(ALICE, ALICE_SERVICES, count=30, spread_ms=500)
    # Final windows arrive over the socket (2 s windows, 1 s lateness): the totals and the
    # freshness line move without a reload.
    wait_for(lambda: page.locator("#kpis .kpi-value").first.inner_text() != before,
             timeout=20, what="the request total to move")
    wait_for(lambda: page.locator("#freshness").inner_text() != final_before,
             what="the freshness line to move")
    assert "final up to" in page.locator("#freshness").inner_text()
    label = page.locator("#chart-latency").get_attribute("aria-label") or ""
    assert "openai p95" in label
    assert pages.unexpected_errors() == []


def test_provisional_updates_move_the_charts_within_seconds(server: Server, pages: Pages) -> None:
    """The live tier (DESIGN §9): `"final": false` frames draw a dotted tail with a live dot
    and move the freshness line's "live up to", before the window's final record."""
    page = pages.open()
    pages.sign_in(page, ALICE)
    page.locator("#ranges button[data-range='15m']").click()
    wait_for(lambda: points(page, "chart-rps") >= 6, what="history points")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    sent = time.monotonic()
    server.send_events(ALICE, ALICE_SERVICES, count=40, spread_ms=300)
    wait_for(lambda: "live up to" in page.locator("#freshness").inner_text(), timeout=10,
             what="a provisional update")
    took = time.monotonic() - sent
    assert page.locator("#chart-rps circle.live").count() >= 1
    assert "(provisional)" in (page.locator("#chart-rps").get_attribute("aria-label") or "")
    assert took < 5, f"the first provisional update took {took:.1f} s"
    assert pages.unexpected_errors() == []


def test_a_user_never_sees_another_users_rows(server: Server, pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, BOB)
    page.locator("#ranges button[data-range='15m']").click()
    expect(page.locator("#services-body")).to_contain_text("twilio")
    page.get_by_role("tab", name="Activity").click()
    server.send_events(ALICE, ALICE_SERVICES, count=20, spread_ms=300)
    server.send_events(BOB, BOB_SERVICES, count=20, spread_ms=300)
    wait_for(lambda: page.locator("#feed-list li").count() >= 10, what="Bob's events")
    page.get_by_role("tab", name="Usage").click()
    page.wait_for_timeout(3500)  # Alice's final windows would have arrived by now
    text = page.locator("body").inner_text()
    for foreign in (ALICE, "openai", "stripe"):
        assert foreign not in text, foreign
    services = page.locator("#service-filter option").all_inner_texts()
    assert services == ["All services", "twilio"]
    assert pages.unexpected_errors() == []


def received(page: Page) -> int:
    return int(page.locator("#feed-count").inner_text().split()[0].replace(",", ""))


def test_the_activity_feed_keeps_up_capped_and_filtered(server: Server, pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, BOB)
    page.get_by_role("tab", name="Activity").click()
    page.wait_for_timeout(500)  # the `subscribe` took effect
    server.send_events(BOB, BOB_SERVICES, count=3000, spread_ms=2000)
    wait_for(lambda: received(page) > 1000, what="a burst of events")
    assert page.locator("#feed-list li").count() <= 200  # capped, however many arrive
    page.locator("#feed-status button[data-status='5xx']").click()
    server.send_events(BOB, BOB_SERVICES, count=200, spread_ms=500, status=503)
    wait_for(lambda: page.locator("#feed-list li.s5").count() > 50, what="5xx rows")
    assert page.locator("#feed-list li:not(.s5)").count() == 0
    page.locator("#feed-pause").click()
    rows = page.locator("#feed-list").inner_text()
    server.send_events(BOB, BOB_SERVICES, count=100, spread_ms=300, status=503)
    wait_for(lambda: "new" in page.locator("#feed-pause").inner_text(), what="events held")
    assert page.locator("#feed-list").inner_text() == rows  # paused: the list holds still
    page.locator("#feed-pause").click()
    wait_for(lambda: page.locator("#feed-list").inner_text() != rows, what="the feed to resume")
    assert pages.unexpected_errors() == []


def _announce(server: Server, title: str) -> None:
    status, answer = server.call("POST", "/v1/admin/announcements", server.admin(),
                                 {"title": title, "message": "The dashboard test says hello.",
                                  "type": "info"})
    assert status in (201, 202), answer


def test_the_bell_badge_mark_read_reload_and_a_second_tab(server: Server, pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, CAROL)
    if page.locator("#bell").is_hidden():
        pytest.skip("this server has no /v1/notifications routes")
    title = f"Maintenance {uuid.uuid4().hex[:6]}"
    _announce(server, title)
    # Live: a toast and the badge.
    expect(page.locator("#toasts")).to_contain_text(title)
    expect(page.locator("#bell-badge")).to_be_visible()
    page.locator("#bell-button").click()
    item = page.locator("#bell-list li", has_text=title)
    expect(item).to_have_class("note unread info")
    unread = int(page.locator("#bell-badge").inner_text())

    second = pages.tab(page.context)  # another tab: its own session storage, so sign in
    pages.sign_in(second, CAROL)
    second.locator("#bell-button").click()
    expect(second.locator("#bell-list li", has_text=title)).to_have_class("note unread info")

    item.get_by_role("button", name=f"Mark read: {title}").click()
    expect(item).to_have_class("note read info")
    expect(page.locator("#bell-badge")).to_have_text(str(unread - 1)) if unread > 1 else expect(
        page.locator("#bell-badge")).to_be_hidden()
    # The other tab hears it over its socket (notification_read).
    expect(second.locator("#bell-list li", has_text=title)).to_have_class("note read info")
    # And it survives a reload (the store has it).
    page.reload()
    page.locator("#bell-button").click()
    expect(page.locator("#bell-list li", has_text=title)).to_have_class("note read info")
    assert pages.unexpected_errors() == []


def test_an_error_burst_raises_a_toast_and_the_badge(server: Server, pages: Pages) -> None:
    dave = f"dave-{uuid.uuid4().hex[:6]}"
    page = pages.open()
    pages.sign_in(page, dave)
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    if page.locator("#bell").is_hidden():
        pytest.skip("this server has no /v1/notifications routes")
    badge = page.locator("#bell-badge")
    before = 0 if badge.is_hidden() else int(badge.inner_text())
    # Every request fails for 5 s: the default rule `error_rate > 0.05` (two windows running,
    # at least 20 requests each) fires at the second window's close.
    server.send_events(dave, {"openai": 200.0}, count=150, spread_ms=5000, status=500)
    expect(page.locator("#toasts")).to_contain_text("Alert:", timeout=20_000)
    wait_for(lambda: badge.is_visible() and int(badge.inner_text()) > before,
             what="the alert's notification on the badge")
    page.get_by_role("tab", name="Alerts").click()
    expect(page.locator("#firing-list")).to_contain_text("openai")
    assert pages.unexpected_errors() == []


def test_rules_are_created_disabled_and_deleted(server: Server, pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, BOB)
    page.get_by_role("tab", name="Alerts").click()
    if page.locator("#rules").is_hidden():
        pytest.skip("this server has no /v1/alert-rules routes")
    expect(page.locator("#rules-body tr").first).to_be_visible()  # the defaults
    name = f"Cost watch {uuid.uuid4().hex[:4]}"
    page.get_by_role("button", name="New rule").click()
    form = page.locator("#rule-form")
    form.locator("input[name=name]").fill(name)
    form.locator("select[name=metric]").select_option("cost_usd")
    form.locator("input[name=threshold]").fill("25")
    form.locator("input[name=service]").fill("twilio")
    form.get_by_role("button", name="Save").click()
    row = page.locator("#rules-body tr", has_text=name)
    expect(row).to_contain_text("cost_usd > 25")
    expect(row).to_contain_text("twilio")
    status, listed = server.call("GET", "/v1/alert-rules", server.token(BOB))
    assert status == 200, listed
    stored = next(r for r in listed["items"] if r["name"] == name)
    assert stored["enabled"] and stored["threshold"] == 25 and stored["service"] == "twilio"
    row.get_by_role("checkbox", name=f"Enabled: {name}").uncheck()
    wait_for(lambda: not next(r for r in server.call("GET", "/v1/alert-rules",
                                                     server.token(BOB))[1]["items"]
                              if r["name"] == name)["enabled"], what="the rule disabled")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Delete {name}").click()
    expect(page.locator("#rules-body")).not_to_contain_text(name)
    assert all(r["name"] != name
               for r in server.call("GET", "/v1/alert-rules", server.token(BOB))[1]["items"])
    assert pages.unexpected_errors() == []


@pytest.mark.parametrize(("name", "width", "height", "dark"), [
    ("phone", 375, 812, False), ("desktop", 1440, 900, False),
    ("phone-dark", 375, 812, True), ("desktop-dark", 1440, 900, True)])
def test_layouts_have_no_horizontal_scroll(server: Server, pages: Pages, name: str, width: int,
                                           height: int, dark: bool) -> None:
    page = pages.open(width=width, height=height, dark=dark)
    page.goto(server.url + "/")
    expect(page.locator("#dev-form")).to_be_visible()
    assert no_horizontal_scroll(page), "sign-in"
    pages.sign_in(page, ALICE)
    page.locator("#ranges button[data-range='15m']").click()
    wait_for(lambda: points(page, "chart-rps") >= 6, what="history points")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    server.send_events(ALICE, ALICE_SERVICES, count=40, spread_ms=4000)  # the live tail
    page.wait_for_timeout(1500)
    for tab in ("Alerts", "Activity", "Usage"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(150)
        assert no_horizontal_scroll(page), tab
    page.locator("#bell-button").click()
    box = page.locator("#bell-panel").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, box
    assert no_horizontal_scroll(page), "the bell's dropdown"
    page.keyboard.press("Escape")
    page.evaluate("document.activeElement.blur()")  # no focus ring in the screenshots
    page.wait_for_timeout(500)
    if name in ("desktop", "phone"):
        page.screenshot(path=str(DOCS / f"dashboard-{name}.png"), full_page=name == "phone")
    else:
        page.screenshot(path=str(DOCS / f"dashboard-{name}.png"))
    assert pages.unexpected_errors() == []


def test_system_monitor_for_admins(server: Server, pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, ALICE, "admin")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    page.get_by_role("tab", name="System").click()
    expect(page.locator("#system-cards")).to_contain_text("Connections", timeout=15_000)
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    assert pages.unexpected_errors() == []


def test_keyboard_reaches_the_controls(server: Server, pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, ALICE)
    page.get_by_role("tab", name="Usage").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Alerts")).to_be_focused()
    expect(page.locator("#view-alerts")).to_be_visible()
    page.locator("#bell-button").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#bell-panel")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#bell-panel")).to_be_hidden()
    expect(page.locator("#bell-button")).to_be_focused()
    for control in page.locator("button:visible, select:visible, input:visible").all():
        name = control.get_attribute("aria-label") or control.inner_text() or control.evaluate(
            "e => e.labels && e.labels.length ? e.labels[0].innerText : ''")
        assert name.strip(), control.evaluate("e => e.outerHTML")
    assert pages.unexpected_errors() == []


def _notification(user: str, title: str) -> bytes:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    body: dict[str, Any] = {"kind": "notification", "notification_id": f"test:{uuid.uuid4().hex}",
                            "user_id": user, "type": "warning", "template": "announcement",
                            "title": title, "message": "sent while the server was down",
                            "created_at": now, "data": {}}
    return json.dumps(body).encode()


def _alert(user: str, rule: str) -> bytes:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return json.dumps({
        "alert_id": f"test:{uuid.uuid4().hex}", "rule_id": "rule-test", "rule_name": rule,
        "user_id": user, "service": "openai", "metric": "error_rate", "op": ">",
        "threshold": 0.05, "value": 0.5, "severity": "critical", "state": "firing",
        "window_start": now, "window_end": now, "fired_at": now,
        "message": "produced while the server was down"}).encode()


def test_restart_shows_reconnecting_then_connected_and_resumes(server: Server,
                                                                pages: Pages) -> None:
    page = pages.open()
    pages.sign_in(page, ALICE)
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    pages.allowed.append("WebSocket connection to")  # the browser logs each refused retry
    pages.allowed.append("Failed to load resource")  # requests during the restart
    pages.allowed.append("Failed to fetch")
    server.run.stop()
    expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    # A notification produced while no bridge runs: the resume cursor brings it, once.
    title = f"While you were away {uuid.uuid4().hex[:6]}"
    produce(server.settings, "notifications", [(ALICE.encode(), _notification(ALICE, title))])
    rule = f"Down-time rule {uuid.uuid4().hex[:6]}"
    produce(server.settings, "usage.alerts", [(ALICE.encode(), _alert(ALICE, rule))])
    server.run.start()
    server.run.wait_healthy()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected",
                                                      timeout=30_000)
    expect(page.locator("#toasts")).to_contain_text(title, timeout=15_000)
    assert page.locator("#toasts .toast", has_text=title).count() == 1
    expect(page.locator("#toasts")).to_contain_text(rule)
    assert page.locator("#toasts .toast", has_text=rule).count() == 1
    assert pages.unexpected_errors() == []

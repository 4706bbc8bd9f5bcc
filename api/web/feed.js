// feed.js: the activity feed (channel `activity`): batched per animation frame, capped.

import { $, $$, fmt, h, nf } from "./dom.js";

const FEED_CAP = 200; // rows kept in the list
const FEED_BUFFER = 1000; // events kept while paused or between frames
const FRAME_ROWS = 60; // rows drawn per frame at most: beyond, a burst shows its newest

const feed = { buffer: [], recent: [], paused: false, missed: 0, rendered: 0, received: 0, pending: false, service: "", status: "" };

function statusClass(code) { return `${Math.floor(code / 100)}xx`; }

export function onUsageEvent(e) {
  feed.received += 1;
  feed.buffer.push(e);
  feed.recent.push(e);
  if (feed.recent.length > 2 * FEED_BUFFER) feed.recent.splice(0, FEED_BUFFER);
  if (feed.buffer.length > FEED_BUFFER) feed.buffer.splice(0, feed.buffer.length - FEED_BUFFER);
  if (feed.paused) { feed.missed += 1; return; }
  if (!feed.pending) { feed.pending = true; requestAnimationFrame(() => renderFeed()); }
}

/** One DOM update per frame: the newest matching events (at most FRAME_ROWS) go on top, the
 * list is trimmed to FEED_CAP rows. 1,000 events/s is ~17 rows a frame; a faster burst draws
 * its newest 60 a frame (nobody reads faster), counted all the same. */
function renderFeed(refilter = false) {
  feed.pending = false;
  const list = $("#feed-list");
  if (refilter) { // a filter changed: the list again, from the recent events
    list.replaceChildren();
    feed.buffer = feed.recent.slice(-FEED_BUFFER);
  }
  const fresh = feed.buffer.splice(0).filter((e) =>
    (!feed.service || e.service === feed.service) && (!feed.status || statusClass(e.status_code) === feed.status));
  const take = fresh.slice(refilter ? -FEED_CAP : -FRAME_ROWS);
  const fragment = document.createDocumentFragment();
  for (let i = take.length - 1; i >= 0; i--) {
    const e = take[i];
    const ts = typeof e.ts === "number" ? e.ts : Date.parse(e.ts);
    fragment.append(h("li", { class: `row s${Math.floor(e.status_code / 100)}` },
      h("time", {}, fmt.clock(ts)), h("span", { class: "svc" }, e.service),
      h("span", { class: "code" }, e.status_code), h("span", { class: "ep" }, `${e.method ?? ""} ${e.endpoint ?? ""}`.trim() || e.api_key_id),
      h("span", { class: "lat" }, fmt.ms(e.latency_ms))));
  }
  list.prepend(fragment);
  while (list.childElementCount > FEED_CAP) list.lastElementChild.remove();
  feed.rendered += take.length;
  $("#feed-empty").hidden = list.childElementCount > 0;
  $("#feed-count").textContent = `${nf.format(feed.received)} events received`;
}

function setPaused(paused) {
  feed.paused = paused;
  const button = $("#feed-pause");
  button.setAttribute("aria-pressed", String(paused));
  button.textContent = paused ? `Resume${feed.missed ? ` (${nf.format(feed.missed)} new)` : ""}` : "Pause";
  if (!paused) { feed.missed = 0; renderFeed(); }
}

export function setupFeed() {
  $("#feed-pause").addEventListener("click", () => setPaused(!feed.paused));
  $("#feed-service").addEventListener("change", (e) => { feed.service = e.target.value; renderFeed(true); });
  for (const chip of $$("#feed-status button")) {
    chip.addEventListener("click", () => {
      feed.status = chip.dataset.status;
      for (const c of $$("#feed-status button")) c.setAttribute("aria-pressed", String(c === chip));
      renderFeed(true);
    });
  }
  // Scrolling down to read pauses the feed; back at the top it runs again.
  $("#feed-list").addEventListener("scroll", (e) => {
    const away = e.target.scrollTop > 40;
    if (away !== feed.paused) setPaused(away);
  }, { passive: true });
  setInterval(() => { if (feed.paused) setPaused(true); }, 1000);
}

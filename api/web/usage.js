// usage.js: the usage view. History over HTTP, then live `usage_stats_update` frames.

import { lineChart } from "./charts.js";
import { $, $$, fmt, h, toast } from "./dom.js";
import { api, query, session, view } from "./session.js";

const RANGES = {
  "15m": { ms: 15 * 60_000, interval: "10s", stepMs: 10_000 },
  "1h": { ms: 3_600_000, interval: "10s", stepMs: 10_000 },
  "6h": { ms: 6 * 3_600_000, interval: "1m", stepMs: 60_000 },
  "24h": { ms: 86_400_000, interval: "1m", stepMs: 60_000 },
  "7d": { ms: 7 * 86_400_000, interval: "1h", stepMs: 3_600_000 },
};
const REFETCH_MS = 60_000; // history again (drift from races and late windows heals)
// A final window that reaches the page this soon after a history request started may already
// be in its answer (the pipeline stores a window, then announces it): it is left out of the
// figures, and the history is asked again, until an answer settles which it is.
const SETTLE_MS = 1_000;

export const usage = {
  range: "1h",
  service: "",
  services: [], // busiest first
  history: new Map(), // service → Map(bucket ms → point)
  live: new Map(), // service → Map(window start ms → {rec, provisional, at})
  fetchedAt: 0,
  askedAt: 0, // when the request behind `history` started
  settling: null, // a timer: the history again, to settle final windows that may be in it
  triedAt: 0,
  finalUpTo: 0,
  liveUpTo: 0,
  summary: null,
  rows: [],
  rowsAt: 0, // when the rows were asked (ms)
  loading: null,
};

function serviceColor(service) {
  const at = usage.services.indexOf(service);
  return at < 0 ? 7 : at % 8;
}

export async function loadUsage() {
  const range = RANGES[usage.range];
  const to = Date.now();
  const askedAt = to;
  const from = to - range.ms;
  const span = { from: new Date(from).toISOString(), to: new Date(to + range.stepMs).toISOString() };
  const token = {};
  usage.loading = token;
  usage.busy = true;
  usage.triedAt = Date.now();
  $("#usage").setAttribute("aria-busy", "true");
  try {
    const [breakdown, summary] = await Promise.all([
      api("GET", `/v1/usage/breakdown?${query({ ...span, by: "service" })}`),
      api("GET", `/v1/usage/summary?${query({ ...span, service: usage.service })}`),
    ]);
    const services = breakdown.rows.map((r) => r.group);
    for (const name of usage.live.keys()) if (!services.includes(name)) services.push(name);
    const wanted = usage.service ? [usage.service] : services.slice(0, 8);
    const series = await Promise.all(wanted.map((service) =>
      api("GET", `/v1/usage/timeseries?${query({ ...span, interval: range.interval, service })}`)));
    if (usage.loading !== token) return; // a newer load is under way
    usage.services = services;
    usage.rows = breakdown.rows;
    usage.rowsAt = askedAt;
    usage.summary = summary;
    usage.history = new Map();
    wanted.forEach((service, i) => {
      const buckets = new Map();
      for (const p of series[i].points) buckets.set(Date.parse(p.time), p);
      usage.history.set(service, buckets);
    });
    usage.fetchedAt = Date.now();
    usage.askedAt = askedAt;
    // A final window announced before the request started is in its answer; one announced
    // just after may be too (unsettled: left out, and the history asked again soon).
    let unsettled = false;
    for (const windows of usage.live.values()) {
      for (const [start, w] of windows) {
        if (w.provisional) continue;
        if (w.at < askedAt) windows.delete(start);
        else if ((w.unsettled = w.at - askedAt < SETTLE_MS)) unsettled = true;
      }
    }
    if (unsettled) settleSoon();
    const lastPoint = Math.max(0, ...series.flatMap((s) => s.points.map((p) => Date.parse(p.time))));
    usage.finalUpTo = Math.max(usage.finalUpTo, lastPoint ? lastPoint + range.stepMs : 0);
    renderServiceFilter();
    drawUsage();
  } catch (error) {
    if (error.status !== 401) toast("Could not load usage", error.message, "error");
  } finally {
    if (usage.loading === token) {
      usage.busy = false;
      $("#usage").setAttribute("aria-busy", "false");
    }
  }
}

export function onStats(rec, frame) {
  const provisional = rec.final === false;
  const start = Date.parse(rec.window_start);
  const end = Date.parse(rec.window_end);
  if (!usage.live.has(rec.service)) usage.live.set(rec.service, new Map());
  const windows = usage.live.get(rec.service);
  const known = windows.get(start);
  if (known && !known.provisional && provisional) return; // the final already replaced it
  const at = Date.now();
  const unsettled = !provisional && usage.askedAt > 0 && at - usage.askedAt < SETTLE_MS;
  windows.set(start, { rec, provisional, at, unsettled });
  if (unsettled) settleSoon();
  if (provisional) usage.liveUpTo = Math.max(usage.liveUpTo, frame?.ts ?? Date.now());
  else usage.finalUpTo = Math.max(usage.finalUpTo, end);
  if (!usage.services.includes(rec.service)) {
    usage.services.push(rec.service);
    renderServiceFilter();
  }
  // Forget windows that fell out of every range.
  const horizon = Date.now() - RANGES["7d"].ms;
  for (const [s] of windows) if (s < horizon) windows.delete(s);
  scheduleDraw();
}

/** The history again in a second (once), to settle which final windows its answer holds. */
function settleSoon() {
  if (usage.settling) return;
  usage.settling = setTimeout(() => {
    usage.settling = null;
    if (session.token) loadUsage();
  }, 1000);
}

/** The figures per bucket of one service: history, plus live windows that arrived after it
 * (not the unsettled ones in a bucket the history has: it may already count them). */
function bucketsOf(service) {
  const range = RANGES[usage.range];
  const step = range.stepMs;
  const merged = new Map();
  for (const [t, p] of usage.history.get(service) ?? []) {
    merged.set(t, { requests: p.requests, successes: p.successes, p95: p.latency_p95_ms, p99: p.latency_p99_ms,
      tokens: (p.tokens_in ?? 0) + (p.tokens_out ?? 0), cost: p.cost_usd ?? 0, provisional: false });
  }
  const stored = new Set(merged.keys());
  for (const [start, w] of usage.live.get(service) ?? []) {
    const t = start - (start % step);
    // An unsettled final whose bucket the history has may be counted there already; one
    // whose bucket it lacks cannot be (a stored window makes its bucket a point).
    if (w.unsettled && stored.has(t)) continue;
    const r = w.rec;
    const b = merged.get(t);
    if (!b) {
      merged.set(t, { requests: r.requests, successes: r.successes, p95: r.latency_p95_ms, p99: r.latency_p99_ms,
        tokens: r.tokens_in + r.tokens_out, cost: r.cost_usd, provisional: w.provisional });
      continue;
    }
    // Adding a window to a bucket: counts add up; percentiles cannot, so the bucket shows
    // the worst window's until the next fetch brings the exact figure.
    b.requests += r.requests;
    b.successes += r.successes;
    b.tokens += r.tokens_in + r.tokens_out;
    b.cost += r.cost_usd;
    b.p95 = Math.max(b.p95 ?? 0, r.latency_p95_ms);
    b.p99 = Math.max(b.p99 ?? 0, r.latency_p99_ms);
    b.provisional = b.provisional || w.provisional;
  }
  return merged;
}

let drawPending = false;
export function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; drawUsage(); });
}

export function drawUsage() {
  if (view.current !== "usage" || !session.token) return;
  const range = RANGES[usage.range];
  const step = range.stepMs;
  const to = Date.now();
  const from = to - range.ms;
  const first = from - (from % step);
  const known = Math.max(usage.finalUpTo, usage.fetchedAt - 20_000);
  const shown = usage.service ? [usage.service] : usage.services.slice(0, 8);
  const rps = [], success = [], latency = [];
  const totals = { requests: 0, successes: 0, tokens: 0, cost: 0 };
  const newest = new Map(); // service → its newest bucket with requests (the legend's data-*)
  for (const service of shown) {
    const buckets = bucketsOf(service);
    const color = serviceColor(service);
    const pts = { rps: [], ok: [], p95: [], p99: [] };
    for (let t = first; t <= to; t += step) {
      const b = buckets.get(t);
      if (!b) {
        // No requests in a bucket that is already final: zero; in a recent one: unknown yet.
        pts.rps.push({ t, v: t + step <= known ? 0 : null });
        pts.ok.push({ t, v: null });
        pts.p95.push({ t, v: null });
        pts.p99.push({ t, v: null });
        continue;
      }
      const mid = t;
      newest.set(service, { t, ...b });
      pts.rps.push({ t: mid, v: b.requests / (step / 1000), provisional: b.provisional });
      pts.ok.push({ t: mid, v: b.requests ? b.successes / b.requests : null, provisional: b.provisional });
      pts.p95.push({ t: mid, v: b.p95, provisional: b.provisional });
      pts.p99.push({ t: mid, v: b.p99, provisional: b.provisional });
      if (t >= first) {
        totals.requests += b.requests; totals.successes += b.successes; totals.tokens += b.tokens; totals.cost += b.cost;
      }
    }
    rps.push({ name: service, color, points: pts.rps });
    success.push({ name: service, color, points: pts.ok });
    latency.push({ name: `${service} p95`, color, points: pts.p95 });
    latency.push({ name: `${service} p99`, color, points: pts.p99, dashed: true });
  }
  lineChart($("#chart-rps"), { series: rps, from, to, format: fmt.rate, label: "Requests per second" });
  // The scale starts near the lowest rate, so a dip from 99.9 % to 97 % is visible.
  const lowest = Math.min(1, ...success.flatMap((s) => s.points.map((p) => p.v ?? 1)));
  const floor = [0.99, 0.95, 0.9, 0.75, 0.5].find((f) => lowest >= f) ?? 0;
  lineChart($("#chart-success"), { series: success, from, to, yMin: floor === 0.99 ? 0.98 : floor, yMax: 1,
    format: fmt.pct, label: "Success rate" });
  lineChart($("#chart-latency"), { series: latency, from, to, format: fmt.ms, label: "Latency p95 and p99" });
  renderLegend(shown, newest);
  renderKpis(totals);
  renderFreshness();
}

/** One item per service; its data-* attributes hold the figures of the service's newest bucket
 * with requests, as drawn (machine-readable, for tests and scripts: the charts are SVG). */
function renderLegend(shown, newest) {
  const figures = (b) => b && { bucket: new Date(b.t).toISOString(), requests: b.requests, successes: b.successes,
    p95: b.p95 ?? "", p99: b.p99 ?? "", tokens: b.tokens, cost: b.cost, provisional: b.provisional };
  $("#legend").replaceChildren(...shown.map((service) =>
    h("span", { class: "legend-item", dataset: { service, ...figures(newest.get(service)) } },
      h("span", { class: `swatch c${serviceColor(service)}`, "aria-hidden": "true" }), service)));
}

function renderKpis(totals) {
  const s = usage.summary;
  const range = RANGES[usage.range];
  const cards = [
    ["Requests", fmt.int(totals.requests), `${fmt.rate(totals.requests / (range.ms / 1000))}/s on average`],
    ["Success rate", totals.requests ? fmt.pct(totals.successes / totals.requests) : "–", s ? `${fmt.int(s.server_errors)} server errors in range` : ""],
    ["Latency p95", fmt.ms(s?.latency_p95_ms), "over the range, exact"],
    ["Latency p99", fmt.ms(s?.latency_p99_ms), s ? `max ${fmt.ms(s.latency_max_ms)}` : ""],
    ["Tokens", fmt.compact(totals.tokens), s ? `${fmt.compact(s.tokens_in)} in · ${fmt.compact(s.tokens_out)} out` : ""],
    ["Cost", fmt.usd(totals.cost), "in this range"],
  ];
  $("#kpis").replaceChildren(...cards.map(([label, value, note]) =>
    h("div", { class: "kpi" }, h("span", { class: "kpi-label" }, label), h("span", { class: "kpi-value" }, value), h("span", { class: "kpi-note" }, note))));
  const body = $("#services-body");
  body.replaceChildren(...usage.rows.map((r) => h("tr", {},
    h("th", { scope: "row" }, h("span", { class: `swatch c${serviceColor(r.group)}`, "aria-hidden": "true" }), r.group),
    h("td", {}, fmt.int(r.requests)), h("td", {}, fmt.pct(r.success_rate)),
    h("td", {}, fmt.ms(r.latency_p95_ms)), h("td", {}, fmt.ms(r.latency_p99_ms)),
    h("td", {}, fmt.compact(r.tokens_in + r.tokens_out)), h("td", {}, fmt.usd(r.cost_usd)))));
  if (!usage.rows.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No requests in this range.")));
  // The table is the store's figures as last asked (every minute), the cards above move live.
  $("#services-asof").textContent = usage.rows.length && usage.rowsAt
    ? `Stored figures as of ${fmt.clock(usage.rowsAt)}, refreshed every minute; the cards and charts above also count the live windows.`
    : "";
}

function renderFreshness() {
  const final = usage.finalUpTo ? `final up to ${fmt.clock(usage.finalUpTo)}` : "no final window yet";
  const live = usage.liveUpTo ? `live up to ${fmt.clock(usage.liveUpTo)}` : "no provisional updates";
  $("#freshness").textContent = `${final} · ${live}`;
}

export function renderServiceFilter() {
  for (const select of [$("#service-filter"), $("#feed-service")]) {
    const current = select.value;
    select.replaceChildren(h("option", { value: "" }, "All services"),
      ...usage.services.map((s) => h("option", { value: s }, s)));
    select.value = usage.services.includes(current) ? current : "";
  }
}

export function setupUsage() {
  for (const button of $$("#ranges button")) {
    button.addEventListener("click", () => {
      usage.range = button.dataset.range;
      for (const b of $$("#ranges button")) b.setAttribute("aria-pressed", String(b === button));
      loadUsage();
    });
  }
  $("#service-filter").addEventListener("change", (event) => { usage.service = event.target.value; loadUsage(); });
  setInterval(() => { if (session.token && view.current === "usage") drawUsage(); }, 1000);
  setInterval(() => {
    // Again every minute; every 5 s while the range shows nothing (the store may be catching up).
    const every = usage.rows.length ? REFETCH_MS : 5000;
    if (session.token && !usage.busy && Date.now() - usage.triedAt > every) loadUsage();
  }, 5000);
  window.addEventListener("resize", scheduleDraw);
}

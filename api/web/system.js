// system.js: the system monitor (admins): `system_stats` frames and the ClickHouse tables.

import { lineChart } from "./charts.js";
import { $, fmt, h, toast } from "./dom.js";
import { api, can, session, view } from "./session.js";

const system = { cpu: [], last: null };

export function onSystemStats(s) {
  system.last = s;
  system.cpu.push({ t: Date.now(), v: s.process ? s.process.cpu_percent : s.cpu_percent });
  if (system.cpu.length > 120) system.cpu.shift();
  if (view.current === "system") renderSystem();
}

const orDash = (v, f) => (v === null || v === undefined ? "–" : f(v));
const seconds = (v) => (v < 100 ? `${v.toFixed(1)} s` : fmt.duration(v));
const percent = (v) => `${v.toFixed(0)}%`;

/** [label, value, why it is missing] of a `system_stats` frame (schemas/system.py's
 * SystemSnapshot; the bridge's older flat shape too). */
function systemCards(s) {
  if (!s.process) {
    return [["CPU", orDash(s.cpu_percent, percent)], ["Memory (RSS)", orDash(s.memory_rss_bytes, fmt.bytes)],
      ["Uptime", orDash(s.uptime_s, fmt.duration)], ["Connections", orDash(s.connections, fmt.int)],
      ["Users online", orDash(s.users, fmt.int)], ["Consumer lag", orDash(s.consumer?.lag, fmt.int)]];
  }
  const why = (key) => s.unavailable?.[key] ?? s.unavailable?.[key.split(".")[0]] ?? "";
  const ws = s.websocket ?? {};
  const pipe = s.pipeline ?? {};
  return [
    ["CPU (process)", orDash(s.process.cpu_percent, percent), why("process.cpu_percent")],
    ["CPU (machine)", orDash(s.machine?.cpu_percent, percent), why("machine")],
    ["Memory (RSS)", orDash(s.process.memory_rss_bytes, fmt.bytes), ""],
    ["Memory (machine)", orDash(s.machine?.memory_percent, percent), why("machine")],
    ["Uptime", orDash(s.process.uptime_s, fmt.duration), ""],
    ["Connections", orDash(ws.connections, fmt.int), why("websocket")],
    ["Users online", orDash(ws.users, fmt.int), why("websocket")],
    ["Frames out/s", orDash(ws.frames_out_per_s, fmt.rate), why("websocket.frames_out_per_s")],
    ["Pipeline lag", orDash(s.kafka?.lag, fmt.int), why("kafka.lag")],
    ["Events/s", orDash(pipe.events_per_s, fmt.rate), why("pipeline.events_per_s")],
    ["Freshness", orDash(pipe.freshness_s, seconds), why("pipeline.freshness_s")],
    ["Watermark lag", orDash(pipe.watermark_lag_s, seconds), why("pipeline.watermark_lag_s")],
  ];
}

function renderTables(tables) {
  $("#tables-body").replaceChildren(...tables.map((t) => h("tr", {},
    h("th", { scope: "row" }, t.table ?? t.name), h("td", {}, fmt.int(t.rows)),
    h("td", {}, t.bytes_compressed !== undefined ? fmt.bytes(t.bytes_compressed) : t.bytes !== undefined ? fmt.bytes(t.bytes) : "–"))));
}

function renderSystem() {
  const s = system.last;
  if (!s) return;
  $("#system-cards").replaceChildren(...systemCards(s).map(([label, value, missing]) =>
    h("div", { class: "kpi", title: missing || null }, h("span", { class: "kpi-label" }, label),
      h("span", { class: "kpi-value" }, value), missing ? h("span", { class: "kpi-note" }, missing) : null)));
  if (s.clickhouse?.tables) renderTables(s.clickhouse.tables);
  const to = Date.now();
  lineChart($("#chart-cpu"), { series: [{ name: "CPU", color: 0, points: system.cpu }], from: to - 10 * 60_000, to,
    yMin: 0, format: (v) => `${v.toFixed(0)}%`, label: "CPU of this process" });
}

export async function loadSystem() {
  renderSystem();
  const path = can("get", "/v1/admin/system") ? "/v1/admin/system" : can("get", "/v1/admin/tables") ? "/v1/admin/tables" : null;
  if (!path || !session.admin) return;
  try {
    const answer = await api("GET", path);
    if (answer.process && !system.last) { system.last = answer; renderSystem(); }
    renderTables(answer.items ?? answer.clickhouse?.tables ?? []);
  } catch (error) {
    if (error.status !== 401) toast("Could not load system stats", error.message, "error");
  }
}

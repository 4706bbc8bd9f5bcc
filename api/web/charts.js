// charts.js: small hand-written SVG line charts (no library, nothing fetched at run time).
//
// lineChart(svg, {series, from, to, yMin, yMax, format, label}) redraws `svg` in place:
// horizontal grid lines with labels, a time axis, one path per series. A series'
// provisional points (the live tier's open window) are drawn as a dashed tail so the eye
// tells "may still change" from "final". Sized from the element's box on every draw
// (the page redraws on resize), so text never scales.

const NS = "http://www.w3.org/2000/svg";
const PAD = { top: 8, right: 10, bottom: 20, left: 44 };

/** @typedef {{t: number, v: number|null, provisional?: boolean}} ChartPoint */
/** @typedef {{name: string, color: number, points: ChartPoint[], dashed?: boolean}} ChartSeries */

function el(name, attrs, parent) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

/** Round "nice" ticks between lo and hi (about `count` of them). */
export function niceTicks(lo, hi, count = 4) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) ?? raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toFixed(10)));
  }
  return ticks;
}

function timeLabel(ms, spanMs) {
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  if (spanMs > 2 * 86_400_000) return `${d.getMonth() + 1}/${d.getDate()} ${pad(d.getHours())}h`;
  if (spanMs > 2 * 3_600_000) return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** Split a series' points into runs (a null value breaks the line), as "x,y" lists. */
function runs(points, x, y) {
  const out = [];
  let run = [];
  for (const p of points) {
    if (p.v === null || p.v === undefined || Number.isNaN(p.v)) {
      if (run.length) out.push(run);
      run = [];
      continue;
    }
    run.push(p);
  }
  if (run.length) out.push(run);
  return out.map((r) => r.map((p) => ({ ...p, x: x(p.t), y: y(p.v) })));
}

function pathOf(points) {
  return points.map((p, i) => `${i ? "L" : "M"}${p.x.toFixed(1)},${p.y.toFixed(1)}`).join("");
}

/**
 * @param {SVGSVGElement} svg
 * @param {{series: ChartSeries[], from: number, to: number, yMin?: number, yMax?: number,
 *          format: (v: number) => string, label: string}} spec
 */
export function lineChart(svg, spec) {
  const box = svg.getBoundingClientRect();
  const width = Math.max(120, Math.round(box.width || 320));
  const height = Math.max(80, Math.round(box.height || 140));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();

  const values = spec.series.flatMap((s) => s.points.map((p) => p.v)).filter(
    (v) => v !== null && v !== undefined && !Number.isNaN(v));
  let lo = spec.yMin ?? (values.length ? Math.min(...values) : 0);
  let hi = spec.yMax ?? (values.length ? Math.max(...values) : 1);
  if (spec.yMin === undefined && lo > 0) lo = 0;
  if (hi <= lo) hi = lo + (lo === 0 ? 1 : Math.abs(lo) * 0.1);
  const ticks = niceTicks(lo, hi, height < 120 ? 3 : 4);
  if (spec.yMax === undefined && ticks.length > 1 && ticks[ticks.length - 1] < hi) {
    ticks.push(Number((2 * ticks[ticks.length - 1] - ticks[ticks.length - 2]).toFixed(10)));
  }
  if (spec.yMax === undefined) hi = Math.max(hi, ticks[ticks.length - 1]); // the top is a tick

  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const span = Math.max(1, spec.to - spec.from);
  const x = (t) => PAD.left + ((t - spec.from) / span) * plotW;
  const y = (v) => PAD.top + plotH - ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo)) * plotH;

  const grid = el("g", { class: "grid" }, svg);
  for (const tick of ticks) {
    if (tick < lo || tick > hi) continue;
    const ty = y(tick);
    el("line", { x1: PAD.left, x2: width - PAD.right, y1: ty, y2: ty }, grid);
    if (!values.length) continue; // an empty chart: no scale to read
    const text = el("text", { x: PAD.left - 6, y: ty + 3.5, "text-anchor": "end" }, grid);
    text.textContent = spec.format(tick);
  }
  const axis = el("g", { class: "axis" }, svg);
  const xTicks = Math.max(2, Math.min(6, Math.floor(plotW / 90)));
  for (let i = 0; i <= xTicks; i++) {
    const t = spec.from + (span * i) / xTicks;
    const anchor = i === 0 ? "start" : i === xTicks ? "end" : "middle";
    const text = el("text", { x: x(t), y: height - 5, "text-anchor": anchor }, axis);
    text.textContent = timeLabel(t, span);
  }

  let drawn = 0;
  for (const series of spec.series) {
    const cls = `line c${series.color % 8}${series.dashed ? " secondary" : ""}`;
    for (const run of runs(series.points, x, y)) {
      const firstProvisional = run.findIndex((p) => p.provisional);
      const finalPart = firstProvisional < 0 ? run : run.slice(0, firstProvisional);
      const liveTail = firstProvisional < 0 ? [] : run.slice(Math.max(0, firstProvisional - 1));
      if (finalPart.length > 1) el("path", { class: cls, d: pathOf(finalPart) }, svg);
      if (liveTail.length > 1) el("path", { class: `${cls} provisional`, d: pathOf(liveTail) }, svg);
      if (run.length === 1) {
        el("circle", { class: `dot c${series.color % 8}`, cx: run[0].x, cy: run[0].y, r: 2.5 }, svg);
      }
      const last = run[run.length - 1];
      if (last && last.provisional) {
        el("circle", { class: `dot live c${series.color % 8}`, cx: last.x, cy: last.y, r: 3 }, svg);
      }
      drawn += run.length;
    }
  }
  svg.dataset.points = String(drawn);
  if (!drawn) {
    const text = el("text", { class: "empty", x: PAD.left + plotW / 2, y: PAD.top + plotH / 2,
                              "text-anchor": "middle" }, svg);
    text.textContent = "no requests in this range yet";
  }
  svg.setAttribute("aria-label", summary(spec));
}

/** What a screen reader hears: the chart's name and each series' latest value. */
function summary(spec) {
  const parts = spec.series.map((s) => {
    const last = [...s.points].reverse().find((p) => p.v !== null && p.v !== undefined);
    return last ? `${s.name} ${spec.format(last.v)}${last.provisional ? " (provisional)" : ""}`
      : `${s.name} no data`;
  });
  return `${spec.label}: ${parts.length ? parts.join(", ") : "no data"}`;
}

// dom.js: small DOM and formatting helpers of the dashboard, and its toasts.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

// -- formatting ---------------------------------------------------------------------------

export const nf = new Intl.NumberFormat();
export const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const pad2 = (n) => String(n).padStart(2, "0");
export const fmt = {
  int: (v) => (v === null || v === undefined ? "–" : nf.format(Math.round(v))),
  compact: (v) => (v === null || v === undefined ? "–" : compact.format(v)),
  rate: (v) => (v === null || v === undefined ? "–" : v >= 100 ? nf.format(Math.round(v)) : v.toFixed(v >= 10 ? 1 : 2)),
  pct: (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(v >= 0.9995 ? 0 : 1)}%`),
  ms: (v) => (v === null || v === undefined ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`),
  usd: (v) => (v === null || v === undefined ? "–" : `$${v >= 100 ? nf.format(Math.round(v)) : v.toFixed(v >= 1 ? 2 : 4)}`),
  clock: (ms) => { const d = new Date(ms); return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`; },
  when: (iso) => {
    const d = new Date(iso);
    const ago = (Date.now() - d.getTime()) / 1000;
    if (ago < 60) return "just now";
    if (ago < 3600) return `${Math.floor(ago / 60)} min ago`;
    if (ago < 86_400) return `${Math.floor(ago / 3600)} h ago`;
    return d.toLocaleDateString();
  },
  bytes: (v) => (v >= 1 << 30 ? `${(v / (1 << 30)).toFixed(1)} GiB` : v >= 1 << 20 ? `${(v / (1 << 20)).toFixed(v >= 10 << 20 ? 0 : 1)} MiB`
    : v >= 1024 ? `${(v / 1024).toFixed(0)} KiB` : `${v} B`),
  duration: (s) => {
    const d = Math.floor(s / 86_400), h = Math.floor((s % 86_400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
  },
};

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// -- toasts ---------------------------------------------------------------------------------

export function toast(title, message, kind = "info") {
  const host = $("#toasts");
  const node = h("div", { class: `toast ${kind}`, role: kind === "error" || kind === "critical" ? "alert" : "status" },
    h("div", { class: "toast-body" }, h("strong", {}, title), message ? h("p", {}, message) : null),
    h("button", { class: "icon-button", "aria-label": "Dismiss", onclick: () => node.remove() }, "×"));
  host.prepend(node);
  while (host.children.length > 4) host.lastElementChild.remove();
  setTimeout(() => node.classList.add("leaving"), 6500);
  setTimeout(() => node.remove(), 7000);
}

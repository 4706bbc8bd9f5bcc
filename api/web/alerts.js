// alerts.js: alerts firing now, their history, and rule management.

import { $, fmt, h, toast } from "./dom.js";
import { api, can, query } from "./session.js";

const alerts = { firing: new Map(), history: [] };
const METRICS = ["error_rate", "server_error_rate", "success_rate", "latency_p50_ms", "latency_p95_ms",
  "latency_p99_ms", "latency_avg_ms", "requests", "cost_usd", "tokens", "requests_anomaly"];

function alertValue(a) {
  return a.metric.endsWith("_rate") ? fmt.pct(a.value) : a.metric.endsWith("_ms") ? fmt.ms(a.value) : fmt.rate(a.value);
}

export function onAlert(a) {
  const seen = alerts.history.some((x) => x.alert_id === a.alert_id && x.state === a.state);
  if (seen) return;
  alerts.history.unshift(a);
  alerts.history.length = Math.min(alerts.history.length, 200);
  if (a.state === "firing") alerts.firing.set(a.alert_id, a);
  else alerts.firing.delete(a.alert_id);
  renderAlerts();
  toast(a.state === "firing" ? `Alert: ${a.rule_name}` : `Resolved: ${a.rule_name}`,
    `${a.service}: ${a.metric} ${alertValue(a)} (${a.op} ${a.threshold})`, a.state === "firing" ? a.severity : "success");
}

export async function loadAlerts() {
  loadRules();
  if (can("get", "/v1/alerts")) {
    try {
      const [firing, history] = await Promise.all([
        api("GET", `/v1/alerts?${query({ state: "firing", limit: 100 })}`),
        api("GET", `/v1/alerts?${query({ limit: 50 })}`),
      ]);
      alerts.firing = new Map(firing.items.map((a) => [a.alert_id, a]));
      alerts.history = history.items;
    } catch (error) {
      if (error.status !== 401) toast("Could not load alerts", error.message, "error");
    }
  }
  renderAlerts();
}

function renderAlerts() {
  const firing = [...alerts.firing.values()];
  const count = $("#alerts-count");
  count.textContent = String(firing.length);
  count.hidden = firing.length === 0;
  $("#firing-list").replaceChildren(...firing.map((a) => h("li", { class: `alert-item ${a.severity}` },
    h("span", { class: `sev ${a.severity}` }, a.severity),
    h("div", {}, h("strong", {}, a.rule_name), h("p", {}, `${a.service} · ${a.metric} ${alertValue(a)} ${a.op} ${a.threshold}`)),
    h("time", { datetime: a.fired_at }, fmt.when(a.fired_at)))));
  if (!firing.length) $("#firing-list").append(h("li", { class: "empty ok" }, "All clear: nothing is firing."));
  const body = $("#alerts-body");
  body.replaceChildren(...alerts.history.map((a) => h("tr", {},
    h("td", {}, h("span", { class: `state ${a.state}` }, a.state)), h("td", {}, a.rule_name), h("td", {}, a.service),
    h("td", {}, `${a.metric} ${alertValue(a)}`), h("td", {}, h("span", { class: `sev ${a.severity}` }, a.severity)),
    h("td", {}, h("time", { datetime: a.fired_at }, fmt.when(a.state === "resolved" && a.resolved_at ? a.resolved_at : a.fired_at))))));
  if (!alerts.history.length) body.append(h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No alerts yet.")));
}

let rules = [];
async function loadRules() {
  const section = $("#rules");
  section.hidden = !can("get", "/v1/alert-rules");
  if (section.hidden) return;
  try {
    rules = (await api("GET", "/v1/alert-rules")).items;
  } catch (error) {
    if (error.status !== 401) toast("Could not load rules", error.message, "error");
    return;
  }
  $("#rules-body").replaceChildren(...rules.map((r) => h("tr", {},
    h("td", {}, r.name, r.default ? h("span", { class: "tag" }, "default") : null),
    h("td", {}, `${r.metric} ${r.op} ${r.threshold}`), h("td", {}, r.service ?? "all"),
    h("td", {}, h("span", { class: `sev ${r.severity}` }, r.severity)),
    h("td", {}, h("label", { class: "switch" }, h("input", { type: "checkbox", checked: r.enabled, "aria-label": `Enabled: ${r.name}`,
      onchange: (e) => saveRule(r, { enabled: e.target.checked }) }), h("span", { "aria-hidden": "true" }))),
    h("td", { class: "actions" },
      h("button", { class: "link-button", onclick: () => editRule(r), "aria-label": `Edit ${r.name}` }, "Edit"),
      r.default ? null : h("button", { class: "link-button danger", onclick: () => deleteRule(r), "aria-label": `Delete ${r.name}` }, "Delete")))));
}

function ruleBody(r, changes = {}) {
  const body = { name: r.name, metric: r.metric, op: r.op, threshold: Number(r.threshold), service: r.service || null,
    for_windows: Number(r.for_windows ?? 1), resolve_windows: Number(r.resolve_windows ?? 1),
    min_requests: Number(r.min_requests ?? 20), severity: r.severity, enabled: Boolean(r.enabled), ...changes };
  return body;
}

async function saveRule(rule, changes = {}) {
  try {
    if (rule.rule_id) {
      await api("PUT", `/v1/alert-rules/${encodeURIComponent(rule.rule_id)}`, { ...ruleBody(rule, changes), version: rule.version });
    } else {
      await api("POST", "/v1/alert-rules", ruleBody(rule, changes));
    }
    toast("Rule saved", rule.name, "success");
  } catch (error) {
    if (error.status !== 401) toast("Could not save the rule", error.message, "error");
  }
  loadRules();
}

async function deleteRule(rule) {
  if (!window.confirm(`Delete the rule “${rule.name}”?`)) return;
  try {
    await api("DELETE", `/v1/alert-rules/${encodeURIComponent(rule.rule_id)}`);
    toast("Rule deleted", rule.name, "success");
  } catch (error) {
    if (error.status !== 401) toast("Could not delete the rule", error.message, "error");
  }
  loadRules();
}

function editRule(rule) {
  const form = $("#rule-form");
  form.hidden = false;
  form.dataset.ruleId = rule?.rule_id ?? "";
  $("#rule-form-title").textContent = rule ? `Edit “${rule.name}”` : "New rule";
  const r = rule ?? { name: "", metric: "error_rate", op: ">", threshold: 0.05, service: "", for_windows: 1, severity: "warning", enabled: true };
  for (const key of ["name", "metric", "op", "threshold", "for_windows", "severity"]) form.elements[key].value = r[key] ?? "";
  form.elements.service.value = r.service ?? "";
  form.elements.name.readOnly = Boolean(rule?.default);
  form.elements.name.focus();
}

export function setupRules() {
  const form = $("#rule-form");
  form.elements.metric.replaceChildren(...METRICS.map((m) => h("option", { value: m }, m)));
  $("#rule-new").addEventListener("click", () => editRule(null));
  $("#rule-cancel").addEventListener("click", () => { form.hidden = true; });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const known = rules.find((r) => r.rule_id === form.dataset.ruleId);
    const values = Object.fromEntries(new FormData(form));
    form.hidden = true;
    saveRule({ ...(known ?? { enabled: true }), ...values });
  });
}

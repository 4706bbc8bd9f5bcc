// app.js: the keypulse dashboard (docs/dashboard.md). Plain ES module, no build step.
//
// Data flow: history over HTTP (/v1/...), then live over the WebSocket (keypulse-client.js).
// The token lives in sessionStorage only (this tab, gone when it closes): never in a URL,
// never in localStorage. Routes the server does not have (yet) are left alone: the page
// reads /openapi.json once and calls only the operations listed there, so it never asks
// for something that answers 404.

import { KeypulseClient, sameOriginUrl } from "./keypulse-client.js";
import { loadAlerts, onAlert, setupRules } from "./alerts.js";
import { loadBadge, loadNotifications, onNotification, onNotificationRead, removeNotification, setupBell } from "./bell.js";
import { $, $$, fmt, h, toast } from "./dom.js";
import { onUsageEvent, setupFeed } from "./feed.js";
import { TOKEN_KEY, capabilities, can, claims, loadCapabilities, onUnauthorized, session, view } from "./session.js";
import { loadSystem, onSystemStats } from "./system.js";
import { drawUsage, loadUsage, onStats, setupUsage } from "./usage.js";

const DEV = document.documentElement.dataset.mode === "dev";

// -- connection ------------------------------------------------------------------------------

let client = null;

function setLight(state, detail = "") {
  const labels = { idle: "Offline", connecting: "Connecting…", connected: "Live", reconnecting: "Reconnecting…", offline: "Offline", closed: "Offline" };
  const status = $("#status");
  status.dataset.state = state === "connecting" ? "reconnecting" : state === "closed" || state === "idle" ? "offline" : state;
  $(".label", status).textContent = labels[state] ?? state;
  status.title = detail || labels[state];
  $("#retry").hidden = state !== "offline" && state !== "reconnecting";
}

function connect() {
  client = new KeypulseClient({ url: sameOriginUrl(), token: () => session.token });
  session.client = client;
  client.on("state", ({ state, reason, delayMs }) => {
    const detail = state === "reconnecting" && delayMs ? `retrying in ${(delayMs / 1000).toFixed(1)} s`
      : reason === "unauthorized" ? "the server refused the token" : reason === "network" ? "the browser is offline" : "";
    setLight(state, detail);
    if (state === "offline" && reason === "unauthorized") signOut("The server refused this token: sign in again.");
  });
  client.on("authenticated", (data) => {
    session.user = data.user_id;
    session.roles = data.roles ?? [];
    $("#who-user").textContent = data.user_id;
    $("#who-role").textContent = session.admin ? "admin" : "user";
    $("#tab-system").hidden = !session.admin;
    if (session.admin && !client.monitoring) client.subscribeMonitoring(); // kept across reconnects
    // Anything may have happened while we were away: the replay brings alerts and
    // notifications; the rest is fetched again.
    if (started) refreshAfterReconnect();
    started = true;
  });
  client.on("resync", () => { loadNotifications(); loadAlerts(); });
  client.on("usage_stats_update", onStats);
  client.on("usage_alert", onAlert);
  client.on("new_notification", (n) => onNotification(n, false));
  client.on("system_notification", (n) => onNotification(n, true));
  client.on("notification_read", onNotificationRead);
  client.on("notification_deleted", (d) => removeNotification(d.notification_id));
  client.on("usage_event", onUsageEvent);
  client.on("system_stats", onSystemStats);
  client.on("api_key_update", (k) => toast(`API key ${k.action}`, `${k.name || k.api_key_id} (${k.service})`, "info"));
  client.connect();
}
let started = false;

function refreshAfterReconnect() {
  loadUsage();
  loadBadge();
}

// -- views ------------------------------------------------------------------------------------

function showView(name, focus = false) {
  view.current = name;
  for (const tab of $$("[role=tab]")) {
    const selected = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    if (selected && focus) tab.focus();
  }
  for (const panel of $$("[role=tabpanel]")) panel.hidden = panel.id !== `view-${name}`;
  if (client) {
    if (name === "activity") client.subscribe(["activity"]);
    else if (client.channels.has("activity")) client.unsubscribe(["activity"]);
  }
  if (name === "alerts") loadAlerts();
  if (name === "system") loadSystem();
  if (name === "usage") drawUsage();
}

function setupTabs() {
  const tabs = $$("[role=tab]");
  for (const tab of tabs) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
    tab.addEventListener("keydown", (event) => {
      const visible = tabs.filter((t) => !t.hidden);
      const at = visible.indexOf(tab);
      const next = event.key === "ArrowRight" ? visible[(at + 1) % visible.length]
        : event.key === "ArrowLeft" ? visible[(at - 1 + visible.length) % visible.length] : null;
      if (next) { event.preventDefault(); showView(next.dataset.view, true); }
    });
  }
}

// -- sign-in -----------------------------------------------------------------------------------------

function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  client?.close();
  client = null;
  session.client = null;
  started = false;
  showSignIn(message);
}

async function signIn(token) {
  const c = claims(token);
  if (!c || !c.sub) {
    $("#signin-error").textContent = "That does not look like a keypulse token (a JWT).";
    return;
  }
  if (c.exp && c.exp * 1000 < Date.now()) {
    $("#signin-error").textContent = "That token has expired.";
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  session.token = token;
  session.user = c.sub;
  session.roles = Array.isArray(c.roles) ? c.roles : [];
  await startApp();
}

async function devSignIn(userId, role) {
  try {
    const response = await fetch("/v1/dev/token", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user_id: userId, role }),
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data?.error?.message ?? `HTTP ${response.status}`);
    await signIn(data.token);
  } catch (error) {
    $("#signin-error").textContent = `Could not sign in: ${error.message}`;
  }
}

async function showSignIn(message = "") {
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message;
  $("#dev-form").hidden = !DEV;
  $("#token-form").classList.toggle("secondary", DEV);
  if (!DEV) { $("#token-input").focus(); return; }
  $("#dev-user").focus();
  try {
    const response = await fetch("/v1/dev/users?limit=6", { cache: "no-store" });
    const { items } = await response.json();
    $("#dev-users").replaceChildren(...items.map((u) => h("li", {},
      h("button", { type: "button", class: "user-pick", onclick: () => devSignIn(u.user_id, "user") },
        h("span", {}, u.user_id), h("small", {}, `${fmt.compact(u.requests)} requests in the last hour`)))));
    $("#dev-users-empty").hidden = items.length > 0;
  } catch {
    $("#dev-users-empty").hidden = false;
  }
}

function setupSignIn() {
  $("#dev-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const user = $("#dev-user").value.trim();
    if (user) devSignIn(user, $("#dev-form").elements.role.value);
  });
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("#token-input").value.trim());
  });
  $("#signout").addEventListener("click", () => signOut());
  $("#retry").addEventListener("click", () => client?.retryNow());
}

async function startApp() {
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#token-input").value = "";
  $("#who-user").textContent = session.user;
  $("#who-role").textContent = session.admin ? "admin" : "user";
  $("#tab-system").hidden = !session.admin;
  setLight("connecting");
  connect();
  if (!capabilities.size) await loadCapabilities();
  $("#bell").hidden = !can("get", "/v1/notifications");
  showView(view.current);
  loadUsage();
  loadBadge();
}

async function main() {
  onUnauthorized(signOut);
  setupTabs();
  setupUsage();
  setupBell();
  setupRules();
  setupFeed();
  setupSignIn();
  await loadCapabilities();
  if (session.token && claims(session.token)?.exp * 1000 > Date.now()) {
    const c = claims(session.token);
    session.user = c.sub;
    session.roles = Array.isArray(c.roles) ? c.roles : [];
    await startApp();
  } else {
    signOut();
  }
}

main();

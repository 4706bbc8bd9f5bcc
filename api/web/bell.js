// bell.js: the notification bell: badge, dropdown, read state, live notifications.

import { $, fmt, h, toast } from "./dom.js";
import { api, can, query, session } from "./session.js";

const bell = { items: new Map(), order: [], unread: 0, next: null, live: new Set() };

function setBadge(count) {
  bell.unread = Math.max(0, count);
  const badge = $("#bell-badge");
  badge.textContent = bell.unread > 99 ? "99+" : String(bell.unread);
  badge.hidden = bell.unread === 0;
  $("#bell-button").setAttribute("aria-label", `Notifications, ${bell.unread} unread`);
}

/** The badge: the server's count, plus notifications that reached us live and that the
 * store may not hold yet (they travel Kafka → pipeline → store, a second or so behind the
 * socket), so a count fetched meanwhile neither drops nor double-counts them. */
export async function loadBadge() {
  if (!can("get", "/v1/notifications/unread-count")) return;
  try {
    const [count, page] = await Promise.all([
      api("GET", "/v1/notifications/unread-count"),
      bell.live.size ? api("GET", `/v1/notifications?${query({ unread: true, limit: 200 })}`) : { items: [] },
    ]);
    const stored = new Set(page.items.map((n) => n.notification_id));
    for (const id of [...bell.live]) if (stored.has(id) || bell.items.get(id)?.read !== false) bell.live.delete(id);
    setBadge(count.unread + bell.live.size);
  } catch { /* the badge keeps its last count */ }
}

export async function loadNotifications(more = false) {
  if (!can("get", "/v1/notifications")) {
    $("#bell-list").replaceChildren(h("li", { class: "empty" }, "Notifications are not available on this server."));
    return;
  }
  try {
    const page = await api("GET", `/v1/notifications?${query({ limit: 20, cursor: more ? bell.next : null })}`);
    if (!more) { bell.items.clear(); bell.order = []; }
    for (const item of page.items) {
      if (!bell.items.has(item.notification_id)) bell.order.push(item.notification_id);
      bell.items.set(item.notification_id, item);
    }
    bell.next = page.next_cursor;
    renderBell();
  } catch (error) {
    if (error.status !== 401) toast("Could not load notifications", error.message, "error");
  }
  loadBadge();
}

function renderBell() {
  const list = $("#bell-list");
  const items = bell.order.map((id) => bell.items.get(id)).filter(Boolean);
  list.replaceChildren(...items.map((n) => h("li", { class: `note ${n.read ? "read" : "unread"} ${n.type}`, dataset: { id: n.notification_id } },
    h("span", { class: "note-dot", "aria-hidden": "true" }),
    h("div", { class: "note-body" },
      h("strong", {}, n.title), h("p", {}, n.message),
      h("time", { datetime: n.created_at, title: new Date(n.created_at).toLocaleString() }, fmt.when(n.created_at))),
    h("button", { class: "link-button", onclick: () => markRead(n.notification_id, !n.read),
      "aria-label": `${n.read ? "Mark unread" : "Mark read"}: ${n.title}` }, n.read ? "Mark unread" : "Mark read"))));
  if (!items.length) list.append(h("li", { class: "empty" }, "No notifications yet."));
  $("#bell-more").hidden = !bell.next;
  $("#bell-read-all").disabled = bell.unread === 0 || !can("post", "/v1/notifications/read-all");
}

async function markRead(id, read) {
  const item = bell.items.get(id);
  if (!item) return;
  const path = `/v1/notifications/${encodeURIComponent(id)}/${read ? "read" : "unread"}`;
  if (!can("post", "/v1/notifications/{notification_id}/read")) {
    session.client?.markNotificationRead(id, read); // the socket's way, where the route is missing
  } else {
    try {
      await api("POST", path);
    } catch (error) {
      if (error.status !== 401) toast("Could not update the notification", error.message, "error");
      return;
    }
  }
  if (item.read !== read) setBadge(bell.unread + (read ? -1 : 1));
  item.read = read;
  renderBell();
}

async function markAllRead() {
  try {
    await api("POST", "/v1/notifications/read-all");
  } catch (error) {
    if (error.status !== 401) toast("Could not mark all read", error.message, "error");
    return;
  }
  for (const item of bell.items.values()) item.read = true;
  setBadge(0);
  renderBell();
  loadBadge();
}

export function onNotification(n, system) {
  if (bell.items.has(n.notification_id)) return; // a replay of one we have
  bell.items.set(n.notification_id, { ...n, read: false });
  bell.order.unshift(n.notification_id);
  bell.live.add(n.notification_id);
  setBadge(bell.unread + 1);
  renderBell();
  // An alert's notification repeats the `usage_alert` frame, which has its toast already.
  if (!n.template?.startsWith("alert_")) toast(n.title, n.message, system ? "system" : n.type);
}

export function onNotificationRead(change) {
  const item = bell.items.get(change.notification_id);
  if (item && item.read !== change.read) {
    item.read = change.read;
    renderBell();
  }
  clearTimeout(onNotificationRead.timer); // many changes (read-all): one count
  onNotificationRead.timer = setTimeout(loadBadge, 150);
}

export function removeNotification(id) {
  const item = bell.items.get(id);
  if (!item) return;
  bell.items.delete(id);
  bell.order = bell.order.filter((x) => x !== id);
  if (!item.read) setBadge(bell.unread - 1);
  renderBell();
}

export function setupBell() {
  const button = $("#bell-button");
  const panel = $("#bell-panel");
  const close = () => { panel.hidden = true; button.setAttribute("aria-expanded", "false"); };
  button.addEventListener("click", () => {
    const open = panel.hidden;
    panel.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (open) { loadNotifications(); panel.focus(); }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) { close(); button.focus(); }
  });
  document.addEventListener("click", (event) => {
    if (!panel.hidden && !panel.contains(event.target) && !button.contains(event.target)) close();
  });
  $("#bell-read-all").addEventListener("click", markAllRead);
  $("#bell-more").addEventListener("click", () => loadNotifications(true));
}

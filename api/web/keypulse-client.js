// keypulse-client.js: a small client for keypulse's WebSocket bridge (docs/client.md).
//
// One ES module, no dependencies; it runs in browsers and in any runtime with a WHATWG
// WebSocket (Deno, Bun, Node >= 22). SDK authors: copy it, or port it; docs/client.md walks
// through what it does and why (the protocol itself is docs/websocket.md).
//
//   import { KeypulseClient } from "./keypulse-client.js";
//   const client = new KeypulseClient({ url: "wss://keypulse.example/ws", token: () => getToken() });
//   client.on("usage_stats_update", (stats, frame) => draw(stats));
//   client.on("state", ({ state }) => light(state));
//   client.connect();
//
// What it does for you:
// - authenticates with the first frame (never a token in the URL);
// - keeps the resume cursor (the last `cursor` of an alert or notification frame, else the
//   one `authenticated` gave) and sends it as `resume_from` on every reconnect, so no alert
//   or notification is missed across a dropped connection or a server restart;
// - reconnects with exponential backoff and full jitter (a fleet of clients does not come
//   back in lockstep after an outage), at once when the browser comes back online;
// - re-subscribes the channels you asked for, and monitoring, after each reconnect;
// - notices a dead connection (an application ping every 25 s, 10 s for its pong);
// - stops, instead of hammering, when the server refuses the token (4401) or the origin.

/** Channels a connection can receive; all but `activity` are on by default.
 * @typedef {"stats"|"alerts"|"notifications"|"api_keys"|"activity"} Channel */

/** @typedef {"idle"|"connecting"|"connected"|"reconnecting"|"offline"|"closed"} ConnectionState
 * `connecting`: the first attempt; `connected`: authenticated; `reconnecting`: lost, a retry
 * is scheduled or under way; `offline`: the browser is offline, or the server refused us
 * (see `reason`); `closed`: `close()` was called. */

/** The envelope of every server frame.
 * @typedef {object} ServerFrame
 * @property {string} event
 * @property {object} data
 * @property {number} ts     epoch ms when the bridge built the frame
 * @property {number} seq    1, 2, 3… per connection, no gaps
 * @property {string} [cursor] alert and notification frames: where to resume from */

/** `authenticated`.
 * @typedef {object} Authenticated
 * @property {string} user_id
 * @property {string[]} roles
 * @property {string} connection_id
 * @property {string} cursor      resume from here if nothing else arrives
 * @property {number} expires_at  epoch seconds: the token's exp */

/** `usage_stats_update`: a window's stats (DESIGN §2). `final: false` marks a provisional
 * update of the open window (the live tier, DESIGN §9); the final record replaces it.
 * @typedef {object} UsageStats
 * @property {string} user_id
 * @property {string} service
 * @property {string} window_start  RFC 3339
 * @property {string} window_end
 * @property {number} window_seconds
 * @property {number} requests
 * @property {number} successes
 * @property {number} client_errors
 * @property {number} server_errors
 * @property {number} success_rate    a fraction in [0, 1]
 * @property {number} error_rate
 * @property {number} server_error_rate
 * @property {number} latency_avg_ms
 * @property {number} latency_p50_ms
 * @property {number} latency_p95_ms
 * @property {number} latency_p99_ms
 * @property {number} latency_max_ms
 * @property {number} tokens_in
 * @property {number} tokens_out
 * @property {number} cost_usd
 * @property {boolean} [final]  false: provisional; absent or true: final */

/** `usage_alert`: an alert state change (DESIGN §3).
 * @typedef {object} UsageAlert
 * @property {string} alert_id
 * @property {string} rule_id
 * @property {string} rule_name
 * @property {string} service
 * @property {string} metric
 * @property {string} op
 * @property {number} threshold
 * @property {number} value
 * @property {"info"|"warning"|"critical"} severity
 * @property {"firing"|"resolved"} state
 * @property {string} window_start
 * @property {string} window_end
 * @property {string} fired_at
 * @property {string|null} [resolved_at]
 * @property {string} message */

/** `new_notification` and `system_notification` (`user_id` "*").
 * @typedef {object} Notification
 * @property {string} notification_id
 * @property {string} user_id
 * @property {"info"|"success"|"warning"|"error"} type
 * @property {string} template
 * @property {string} title
 * @property {string} message
 * @property {string} created_at
 * @property {Object<string, string>} [data] */

/** `notification_read`: the user changed a notification's read state elsewhere.
 * @typedef {object} NotificationRead
 * @property {string} notification_id
 * @property {boolean} read
 * @property {string} at */

/** `usage_event` (channel `activity`): one raw usage event (DESIGN §1).
 * @typedef {object} UsageEvent
 * @property {string} event_id
 * @property {string|number} ts
 * @property {string} api_key_id
 * @property {string} service
 * @property {number} status_code
 * @property {number} latency_ms
 * @property {string} [endpoint]
 * @property {string} [method] */

/** `system_stats` (admins, after `subscribeMonitoring()`).
 * @typedef {object} SystemStats
 * @property {number} cpu_percent
 * @property {number} memory_rss_bytes
 * @property {number} memory_percent
 * @property {number} uptime_s
 * @property {number} connections
 * @property {number} users
 * @property {number} frames_out_per_s
 * @property {{lag: number, messages_per_s: number, skipped_per_s: number}} consumer */

/** `resync_required`: the cursor could not be honoured; fetch state over HTTP.
 * @typedef {object} ResyncRequired
 * @property {string} reason
 * @property {string} cursor  live data continues from here */

/** @typedef {object} Backoff
 * @property {number} [initialMs=500]  the first retry waits up to this
 * @property {number} [maxMs=10000]    no retry waits longer
 * @property {number} [factor=2] */

/** @typedef {object} ClientOptions
 * @property {string} url  ws:// or wss:// URL of `/ws`
 * @property {string | (() => string | Promise<string>)} token  the JWT, or a function
 *   asked for one before each (re)connection (return a fresh one when it nears expiry)
 * @property {Channel[]} [channels]  subscribed after each authentication (default: the
 *   server's defaults, no `subscribe` sent)
 * @property {string} [cursor]  resume from here on the first connection
 * @property {Backoff} [backoff]
 * @property {number} [pingEveryMs=25000]  0: no application pings
 * @property {number} [pongWithinMs=10000]
 * @property {typeof WebSocket} [WebSocket]  an implementation (default: globalThis's)
 * @property {() => number} [random]  [0, 1) (default Math.random; tests pin it) */

/** Close codes the bridge uses (docs/websocket.md), and what the client does on each. */
export const CLOSE = Object.freeze({
  UNAUTHORIZED: 4401, // token missing, bad or expired: stop (reason "unauthorized")
  ORIGIN: 4403, // this page's origin is not allowed: stop (reason "origin")
  TOO_MANY: 4429, // the user has too many sockets: retry, from the backoff's maximum
  RESUME: 4008, // our queue overflowed: resume at once
  TRY_LATER: 1013, // too many sockets waiting to authenticate: retry with backoff
});

const FATAL = new Map([[CLOSE.UNAUTHORIZED, "unauthorized"], [CLOSE.ORIGIN, "origin"]]);

/** The retry delay before attempt `attempt` (1, 2, …): "full jitter", uniformly random in
 * [0, min(max, initial * factor^(attempt-1))], at least 100 ms.
 * @param {number} attempt @param {Required<Backoff>} b @param {() => number} random */
export function backoffDelay(attempt, b, random = Math.random) {
  const ceiling = Math.min(b.maxMs, b.initialMs * b.factor ** Math.max(0, attempt - 1));
  return Math.max(100, Math.round(random() * ceiling));
}

/** A WebSocket URL for `/ws` on the page's own origin. */
export function sameOriginUrl(path = "/ws", location = globalThis.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

export class KeypulseClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    this.url = options.url;
    this.tokenSource = options.token;
    /** @type {Set<Channel>} */
    this.channels = new Set(options.channels ?? []);
    this.explicitChannels = options.channels !== undefined;
    /** @type {string|null} the resume cursor */
    this.cursor = options.cursor ?? null;
    this.backoff = { initialMs: 500, maxMs: 10_000, factor: 2, ...(options.backoff ?? {}) };
    this.pingEveryMs = options.pingEveryMs ?? 25_000;
    this.pongWithinMs = options.pongWithinMs ?? 10_000;
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    this.random = options.random ?? Math.random;
    /** @type {ConnectionState} */
    this.state = "idle";
    /** why the client stopped (`offline` state): "unauthorized", "origin", "network" */
    this.reason = null;
    this.attempt = 0;
    this.monitoring = false;
    /** @type {Authenticated|null} */
    this.session = null;
    /** @type {Map<string, Set<Function>>} */
    this.handlers = new Map();
    this.socket = null;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.lastSeq = 0;
    this.onOnline = () => { if (this.state === "reconnecting" || this.reason === "network") this.retryNow(); };
    this.onOffline = () => { if (this.state !== "closed") this.setState("offline", "network"); };
  }

  /** Listen to a server event ("usage_stats_update", "usage_alert", …, handler(data, frame)),
   * or to the client's own: "state" ({state, reason, attempt, delayMs, code}), "frame"
   * (every frame), "resync" (a ResyncRequired: refetch over HTTP), "error" (an `error` frame's
   * data, or {code: "bad_frame"}). Returns a function that removes the handler.
   * @param {string} event @param {(data: any, frame?: ServerFrame) => void} handler */
  on(event, handler) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(handler);
    return () => this.handlers.get(event)?.delete(handler);
  }

  emit(event, data, frame) {
    for (const handler of this.handlers.get(event) ?? []) {
      try {
        handler(data, frame);
      } catch (error) {
        queueMicrotask(() => { throw error; }); // a bad handler never breaks the client
      }
    }
  }

  /** Open the connection (and keep it open until `close()`). */
  connect() {
    if (this.state !== "idle" && this.state !== "closed" && this.state !== "offline") return;
    if (typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", this.onOnline);
      globalThis.addEventListener("offline", this.onOffline);
    }
    this.reason = null;
    this.attempt = 0;
    this.setState("connecting");
    this.open();
  }

  /** Close for good (no reconnect). */
  close() {
    this.setState("closed");
    this.teardown(1000, "client closed");
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this.onOnline);
      globalThis.removeEventListener("offline", this.onOffline);
    }
  }

  /** Retry now instead of waiting out the backoff (e.g. the user clicked "retry"). */
  retryNow() {
    if (this.state === "closed" || this.state === "connected") return;
    clearTimeout(this.retryTimer);
    this.reason = null;
    this.setState(this.attempt ? "reconnecting" : "connecting");
    this.open();
  }

  /** @param {Channel[]} channels */
  subscribe(channels) {
    channels.forEach((c) => this.channels.add(c));
    this.explicitChannels = true;
    this.send("subscribe", { channels });
  }

  /** @param {Channel[]} channels */
  unsubscribe(channels) {
    channels.forEach((c) => this.channels.delete(c));
    this.send("unsubscribe", { channels });
  }

  /** Ask for `system_stats` (admins; `error {code: "forbidden"}` otherwise), again after
   * each reconnect. */
  subscribeMonitoring() {
    this.monitoring = true;
    this.send("subscribe_monitoring", {});
  }

  /** Tell the user's other connections (and the store) a notification's read state. */
  markNotificationRead(notificationId, read = true) {
    return this.send("mark_notification_read", { notification_id: notificationId, read });
  }

  /** Extend the session with a fresh token (same user) without reconnecting. */
  async reauthenticate() {
    const token = await this.token();
    return this.send("authenticate", { token });
  }

  /** Send a client frame when connected; false when it was not sent. */
  send(event, data = {}) {
    if (this.state !== "connected" || this.socket?.readyState !== 1) return false;
    this.socket.send(JSON.stringify({ event, data }));
    return true;
  }

  // -- internals ---------------------------------------------------------------------

  setState(state, reason = null, extra = {}) {
    const changed = state !== this.state || reason !== this.reason;
    this.state = state;
    this.reason = reason;
    if (changed) this.emit("state", { state, reason, attempt: this.attempt, ...extra });
  }

  async token() {
    const source = this.tokenSource;
    return typeof source === "function" ? await source() : source;
  }

  async open() {
    this.teardown(1000, "reconnecting");
    let token;
    try {
      token = await this.token();
    } catch {
      token = null;
    }
    if (this.state === "closed" || this.state === "offline") return;
    if (!token) {
      this.setState("offline", "unauthorized");
      return;
    }
    let socket;
    try {
      socket = new this.WebSocketImpl(this.url);
    } catch {
      this.scheduleRetry(0);
      return;
    }
    this.socket = socket;
    this.lastSeq = 0;
    socket.onopen = () => {
      const data = { token };
      if (this.cursor) data.resume_from = this.cursor;
      this.resuming = Boolean(this.cursor);
      socket.send(JSON.stringify({ event: "authenticate", data }));
    };
    socket.onmessage = (message) => this.receive(message.data);
    socket.onerror = () => {}; // the close event follows and says what to do
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.stopHeartbeat();
      this.closed(event.code);
    };
  }

  closed(code) {
    if (this.state === "closed") return;
    const fatal = FATAL.get(code);
    if (fatal) {
      this.setState("offline", fatal, { code });
      return;
    }
    if (globalThis.navigator && globalThis.navigator.onLine === false) {
      this.setState("offline", "network", { code });
      return;
    }
    if (code === CLOSE.TOO_MANY) this.attempt = Math.max(this.attempt, 8);
    this.scheduleRetry(code, code === CLOSE.RESUME ? 100 : undefined);
  }

  scheduleRetry(code, delayMs) {
    this.attempt += 1;
    const delay = delayMs ?? backoffDelay(this.attempt, this.backoff, this.random);
    this.setState("reconnecting", null, { delayMs: delay, code });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      if (this.state === "reconnecting") this.open();
    }, delay);
  }

  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this.emit("error", { code: "bad_frame", message: "a frame that is not JSON" });
      return;
    }
    if (!frame || typeof frame.event !== "string") return;
    if (typeof frame.seq === "number") {
      if (this.lastSeq && frame.seq !== this.lastSeq + 1) {
        this.emit("error", { code: "seq_gap", message: `seq ${this.lastSeq} → ${frame.seq}` });
      }
      this.lastSeq = frame.seq;
    }
    if (typeof frame.cursor === "string") this.cursor = frame.cursor;
    const data = frame.data ?? {};
    switch (frame.event) {
      case "authenticated":
        this.authenticated(data);
        break;
      case "resync_required":
        this.cursor = data.cursor ?? this.cursor;
        this.emit("resync", data, frame);
        break;
      case "pong":
        clearTimeout(this.pongTimer);
        break;
      default:
        break;
    }
    this.emit("frame", frame, frame);
    if (frame.event !== "resync_required") this.emit(frame.event, data, frame);
  }

  authenticated(data) {
    const first = this.session === null;
    const wasConnected = this.state === "connected";
    this.session = data;
    // A resumed connection replays from our cursor, and every replayed frame moves it; take
    // the server's only when we had none (or a resync reset it).
    if (!this.cursor) this.cursor = data.cursor;
    if (wasConnected) return; // a re-authentication on the open socket
    this.attempt = 0;
    this.setState("connected", null, { resumed: this.resuming, first });
    if (this.explicitChannels && this.channels.size) {
      this.send("subscribe", { channels: [...this.channels] });
    }
    if (this.monitoring) this.send("subscribe_monitoring", {});
    this.startHeartbeat();
  }

  startHeartbeat() {
    this.stopHeartbeat();
    if (!this.pingEveryMs) return;
    this.pingTimer = setInterval(() => {
      if (!this.send("ping", {})) return;
      clearTimeout(this.pongTimer);
      this.pongTimer = setTimeout(() => this.socket?.close(4000, "no pong"), this.pongWithinMs);
    }, this.pingEveryMs);
  }

  stopHeartbeat() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
  }

  teardown(code, why) {
    clearTimeout(this.retryTimer);
    this.stopHeartbeat();
    const socket = this.socket;
    this.socket = null;
    if (socket && socket.readyState <= 1) {
      try {
        socket.close(code, why);
      } catch {
        /* already closing */
      }
    }
  }
}

// session.js: who is signed in, the view shown, and the HTTP API (token, errors, what the
// server offers). The token lives in sessionStorage only: this tab, never a URL or localStorage.

export const TOKEN_KEY = "keypulse.token";

export const session = {
  token: sessionStorage.getItem(TOKEN_KEY),
  user: null, // from the token; confirmed by `authenticated`
  roles: [],
  client: null, // the KeypulseClient, while signed in
  get admin() { return this.roles.includes("admin"); },
};

export function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code ?? "error";
  }
}

let unauthorized = () => {};
/** What to do when the server refuses the token (the app signs out). */
export function onUnauthorized(handler) { unauthorized = handler; }

export async function api(method, path, body, headers = {}) {
  // Signed out (a timer or a late handler): nothing to send, and no 401 to provoke.
  if (!session.token) throw new ApiError(401, null);
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${session.token}`, ...(body ? { "Content-Type": "application/json" } : {}), ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (response.status === 401) {
    unauthorized("Your session ended: sign in again.");
    throw new ApiError(401, null);
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const query = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined)).toString();

/** The operations the server has ("get /v1/alerts"), from its OpenAPI document. */
export const capabilities = new Set();
export async function loadCapabilities() {
  try {
    const response = await fetch("/openapi.json", { cache: "no-store" });
    const document_ = await response.json();
    for (const [path, item] of Object.entries(document_.paths ?? {})) {
      for (const method of Object.keys(item)) capabilities.add(`${method} ${path}`);
    }
  } catch {
    /* none known: the page shows what needs nothing optional */
  }
}
export const can = (method, path) => capabilities.has(`${method} ${path}`);

/** The view shown ("usage", "alerts", "activity", "system"). */
export const view = { current: "usage" };

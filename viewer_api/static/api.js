// The JSON API client: bearer token from sessionStorage (the HttpOnly
// pacs_session cookie goes along too), {"error": "..."} bodies as ApiError,
// and any 401 sends the user back to the login screen.

import { t } from "./i18n.js";

const TOKEN_KEY = "pacs.token";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

let onUnauthorized = () => {};

/** Register what to do when the server answers 401 (session gone). */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the cookie still carries the session */
  }
}

function serverMessage(status, body, fallback) {
  if (body && typeof body === "object") {
    if (typeof body.error === "string") return body.error;
    if (typeof body.detail === "string") return body.detail;
    if (typeof body.message === "string") return body.message;
  }
  if (typeof body === "string" && body.trim()) return body.trim().slice(0, 300);
  return fallback || `HTTP ${status}`;
}

// What the user reads first is in the UI's language; the server's own words
// (English, for the IT staff) follow in parentheses.
const LOCALIZED = new Set([403, 404, 413, 422, 429, 500, 502, 503, 504]);

function errorMessage(status, body, fallback) {
  const detail = serverMessage(status, body, fallback);
  return LOCALIZED.has(status) ? `${t(`http_${status}`)} (${detail})` : detail;
}

/** Default deadline of an API call, ms (options.timeout overrides it; 0: none). */
export const API_TIMEOUT_MS = 60000;

/**
 * The call's abort signal: the caller's (options.signal) or the deadline, whichever comes first.
 * Timers, not AbortSignal.timeout/any, so that browsers without them still get a deadline.
 */
function requestDeadline(options) {
  const ms = options.timeout === undefined ? API_TIMEOUT_MS : options.timeout;
  if (!ms) return { signal: options.signal, done() {} };
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new DOMException("deadline passed", "TimeoutError")), ms);
  const caller = options.signal;
  if (caller) {
    if (caller.aborted) controller.abort(caller.reason);
    else caller.addEventListener("abort", () => controller.abort(caller.reason), { once: true });
  }
  return { signal: controller.signal, done: () => clearTimeout(timer) };
}

/**
 * api("GET", "/api/worklist", {query: {...}}) or api("PUT", url, {json: {...}}).
 * Returns the parsed JSON (or null for an empty body); throws ApiError.
 * options.accept overrides the Accept header (DICOM JSON metadata).
 * options.auth401 = false: a 401 is only thrown, not treated as a lost session
 * (the login form and the start-up /api/me probe).
 * options.timeout: ms before the call fails as timed out (default API_TIMEOUT_MS; 0: none).
 * options.unattended: a request the page makes by itself (an automatic refresh): it does not keep the session alive.
 */
export async function api(method, path, options = {}) {
  let url = path;
  if (options.query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(options.query)) {
      if (v !== undefined && v !== null && v !== "") params.append(k, String(v));
    }
    const qs = params.toString();
    if (qs) url += (url.includes("?") ? "&" : "?") + qs;
  }
  const headers = { Accept: options.accept || "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  // Asked by the page itself (options.unattended: the worklist's refresh): not a use of the session,
  // which still ends after its idle time when nobody is at the workstation.
  if (options.unattended) headers["X-Pacs-Unattended"] = "1";
  let body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  // A satellite hospital's link that drops mid-request leaves the socket open
  // for minutes: without a deadline the page waits for ever and a report being
  // saved looks saved. Timed out, the call fails as "cannot reach the server".
  const deadline = requestDeadline(options);
  let response;
  let text;
  try {
    // The pages' Referrer-Policy is no-referrer; with it a browser may send
    // "Origin: null" on a POST, which the server's cross-site check refuses.
    // Our own API may see our own origin: "same-origin" for these requests.
    response = await fetch(url, {
      method, headers, body, credentials: "same-origin", referrerPolicy: "same-origin", signal: deadline.signal,
    });
    text = await response.text();
  } catch (exc) {
    deadline.done();
    // The deadline rejects with its own reason, a TimeoutError; the caller's abort with an AbortError.
    if (exc && exc.name === "TimeoutError") {
      throw new ApiError(0, `${t("network_timeout")} (${method} ${path})`, { timeout: true });
    }
    if (exc && exc.name === "AbortError") throw exc;
    throw new ApiError(0, `${t("network_error")} (${method} ${path}: ${exc && exc.message ? exc.message : "network error"})`);
  }
  deadline.done();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, errorMessage(response.status, data, response.statusText), data);
    if (response.status === 401 && options.auth401 !== false) onUnauthorized(error);
    throw error;
  }
  return data;
}

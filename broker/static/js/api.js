// The REST API with the signed-in token.  The token lives in this tab's
// sessionStorage and only ever travels in the Authorization header.

const KEY = "broker.token";

export function getToken() {
  return sessionStorage.getItem(KEY);
}

export function setToken(token) {
  sessionStorage.setItem(KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// fetch() against the broker: JSON in and out unless `raw` is asked for.
export async function api(method, path, { json, body, raw = false, headers = {}, token } = {}) {
  const h = { Authorization: `Bearer ${token || getToken() || ""}`, ...headers };
  let payload = body;
  if (json !== undefined) {
    h["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  }
  const r = await fetch(path, { method, headers: h, body: payload, cache: "no-store",
                                credentials: "omit", referrerPolicy: "no-referrer" });
  if (!r.ok) {
    let b = null;
    try { b = await r.json(); } catch { /* not JSON */ }
    throw new ApiError(r.status, b);
  }
  if (raw) return r;
  if (r.status === 204) return null;
  return r.json();
}

// Save a Blob under a file name without navigating the page.
export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
}

export const sid = (s) => encodeURIComponent(s);

export function filePath(path) {
  return path.split("/").map(encodeURIComponent).join("/");
}

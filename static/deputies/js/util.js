// Small helpers shared by the pages. Plain ES modules, no build step.

/** Build an element: h("a", {href: "/x", class: "y"}, "text", childNode). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The same words as the server's human_duration: 42s, 3m 05s, 2h 07m, 1d 4h. */
export function formatDuration(ms) {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  const pad = (n) => String(n).padStart(2, "0");
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${pad(seconds % 60)}s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${pad(Math.floor((seconds % 3600) / 60))}m`;
  return `${Math.floor(seconds / 86400)}d ${Math.floor((seconds % 86400) / 3600)}h`;
}

export function formatMoney(value) {
  return "$" + Number(value || 0).toFixed(4);
}

export function formatSize(bytes) {
  const n = Number(bytes || 0);
  if (n < 1024) return `${n} bytes`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function localTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

/** Server-rendered times are UTC; show them in the reader's time zone. */
export function localizeTimes(root = document) {
  for (const node of root.querySelectorAll("time.ev-time[datetime]")) {
    const text = localTime(node.getAttribute("datetime"));
    if (text) node.textContent = text;
  }
}

export function socketUrl(path) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}${path}`;
}

/** Readable text for a connection state, shown in the page's status line. */
export const CONNECTION_TEXT = {
  connecting: "Connecting for live updates…",
  live: "Live",
  polling: "Live updates by polling (the websocket is unavailable)",
  reconnecting: "Connection lost; reconnecting…",
};

export function showConnection(node, state, detail = "") {
  if (!node) return;
  node.dataset.state = state;
  node.textContent = state === "error" ? `Live updates stopped: ${detail}` : CONNECTION_TEXT[state] || state;
}

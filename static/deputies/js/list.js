// The sessions list: status, cost and duration change live; new sessions show a banner.

import { LiveConnection, getJson } from "./live.js";
import { formatDuration, formatMoney, showConnection, socketUrl } from "./util.js";

const config = JSON.parse(document.getElementById("list-config").textContent);
const TERMINAL = new Set(["completed", "failed", "cancelled", "archived"]);
const table = document.getElementById("session-table");
const banner = document.getElementById("list-new");
const rows = new Map();
for (const tr of table ? table.querySelectorAll("tbody tr[data-session-id]") : []) rows.set(Number(tr.dataset.sessionId), tr);
const newest = Math.max(0, ...rows.keys());

function duration(tr) {
  const start = new Date(tr.dataset.created);
  const end = tr.dataset.finished ? new Date(tr.dataset.finished) : new Date();
  return formatDuration(end - start);
}

function update(s) {
  const tr = rows.get(Number(s.id));
  if (!tr) {
    if (config.showNew && Number(s.id) > newest) banner.hidden = false;
    return;
  }
  const badge = tr.querySelector('[data-field="status"]');
  const changed = tr.dataset.status !== s.status;
  if (changed) {
    badge.className = `badge status-${s.status}`;
    badge.textContent = s.status;
    tr.dataset.status = s.status;
    const place = tr.querySelector('[data-field="queue-position"]');
    if (place && s.status !== "queued") place.hidden = true;
    if (TERMINAL.has(s.status)) tr.dataset.finished = s.finished || s.updated || new Date().toISOString();
    else delete tr.dataset.finished;
    tr.classList.remove("changed");
    void tr.offsetWidth; // restart the highlight
    tr.classList.add("changed");
  }
  if (s.cost_usd !== undefined) tr.querySelector('[data-field="cost"]').textContent = formatMoney(s.cost_usd);
  tr.querySelector('[data-field="duration"]').textContent = duration(tr);
}

setInterval(() => {
  for (const tr of rows.values()) if (!TERMINAL.has(tr.dataset.status)) tr.querySelector('[data-field="duration"]').textContent = duration(tr);
}, 1000);

new LiveConnection({
  socketUrl: () => socketUrl("/ws/sessions/"),
  onFrame: (frame) => {
    if (frame.type === "session" && frame.session) update(frame.session);
  },
  poll: async () => {
    const body = await getJson(config.pollUrl);
    for (const s of body.results || body) update(s);
    return false;
  },
  onState: (state, detail) => showConnection(document.getElementById("connection"), state, detail),
  pollInterval: 5000,
}).start();

// The session page: live timeline, status and elapsed time, totals, plan, artifacts, diff, follow-ups.

import { LiveConnection, getJson } from "./live.js";
import { downloadLink, finishTool, renderEvent } from "./timeline.js";
import { formatDuration, formatMoney, formatSize, h, localizeTimes, showConnection, socketUrl } from "./util.js";

const config = JSON.parse(document.getElementById("session-config").textContent);
const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["queued", "running"]);
const TERMINAL = new Set(["completed", "failed", "cancelled", "archived"]);

let after = config.after; // the last seq on the page
const created = new Date(config.created);
let finished = config.finished ? new Date(config.finished) : null;
let status = config.status;
const totals = {
  input: Number(config.totals.input_tokens),
  output: Number(config.totals.output_tokens),
  cost: Number(config.totals.cost_usd),
};

localizeTimes();

// --- status and elapsed time -------------------------------------------------------------------------

function tick() {
  $("elapsed").textContent = formatDuration((finished || new Date()) - created);
}
tick();
setInterval(tick, 1000);

function setActive(active) {
  const cancel = $("cancel-form");
  if (cancel) cancel.hidden = !active;
  const hint = $("followup-hint");
  if (hint) hint.textContent = active ? hint.dataset.active : hint.dataset.idle;
  const steer = $("followup-steer-label");
  if (steer) steer.hidden = !active;
}

function setStatus(value, at) {
  status = value;
  const badge = $("session-status");
  badge.className = `badge status-${value}`;
  badge.textContent = value;
  const place = $("queue-position");
  if (place && value !== "queued") place.hidden = true; // it started (or stopped): no longer waiting
  if (TERMINAL.has(value)) {
    finished = at ? new Date(at) : new Date();
    setActive(false);
  } else {
    finished = null;
    if (ACTIVE.has(value)) setActive(true);
  }
  if (value === "archived") {
    for (const id of ["followup", "archive-form", "cancel-form"]) if ($(id)) $(id).hidden = true;
  }
  showConnectionState();
  tick();
}

// The socket stays open on a finished session (a follow-up starts a new run), but "Live" would say
// work is going on: a finished session says it is finished and that updates resume with a follow-up.
let connectionState = "connecting";
let connectionDetail = "";
function showConnectionState() {
  const node = $("connection");
  if (connectionState === "live" && TERMINAL.has(status)) {
    node.dataset.state = "finished";
    node.textContent =
      status === "archived" ? "Archived: no more updates" : `Finished (${status}); updates resume if a follow-up starts a run`;
    return;
  }
  showConnection(node, connectionState, connectionDetail);
}

// --- side panels ----------------------------------------------------------------------------------------

function addUsage(p) {
  totals.input += Number(p.input_tokens || 0);
  totals.output += Number(p.output_tokens || 0);
  totals.cost += Number(p.cost_usd || 0);
  $("total-input").textContent = totals.input;
  $("total-output").textContent = totals.output;
  $("total-cost").textContent = formatMoney(totals.cost);
}

function showTodos(todos) {
  const list = $("todos");
  list.replaceChildren(
    ...(Array.isArray(todos) ? todos : []).map((t) =>
      h("li", { class: `todo todo-${t.status}` }, h("span", { class: "todo-mark", "aria-hidden": "true" }), h("span", { class: "visually-hidden" }, `${t.status}: `), t.content),
    ),
  );
  $("todos-empty").hidden = list.children.length > 0;
}

function addArtifact(p) {
  // Mid-run workspace checkpoints (crash resume) are the runner's, not the user's: the panel lists
  // what the page lists on load (sessions/web/views.py shown_artifact_kinds).
  if (!p.artifact_id || p.kind === "checkpoint") return;
  $("artifacts").append(h("li", {}, downloadLink(config.downloadUrl, p.artifact_id, p.name), " ", h("span", { class: "muted" }, `${p.kind} · ${formatSize(p.size)}`)));
  $("artifacts-empty").hidden = true;
}

function showIsolationWarning(p) {
  if (p.isolated) return;
  $("isolation-reason").textContent = p.reason || "";
  $("isolation-warning").hidden = false;
}

// --- the diff ------------------------------------------------------------------------------------------

async function loadDiff(artifactId) {
  const container = $("diff-container");
  container.setAttribute("aria-busy", "true");
  container.prepend(h("p", { class: "note", id: "diff-loading" }, "Loading the new diff…"));
  try {
    const response = await fetch(`${config.diffUrl}?artifact=${artifactId}`, {
      credentials: "same-origin",
      headers: { "X-Deputies-Fragment": "1" },
    });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    container.innerHTML = await response.text();
    const add = container.querySelector(".diff-summary .add");
    const del = container.querySelector(".diff-summary .del");
    if (add && del) $("changes-link").replaceChildren("Changes ", h("span", { class: "add" }, add.textContent), " ", h("span", { class: "del" }, del.textContent));
  } catch (err) {
    $("diff-loading")?.remove();
    const retry = h("button", { type: "button", class: "button" }, "Try again");
    retry.addEventListener("click", () => {
      retry.parentElement.remove();
      loadDiff(artifactId);
    });
    container.prepend(h("div", { class: "error-box", role: "alert" }, h("p", {}, `Could not load the new diff (${err.message}). `, retry)));
  } finally {
    container.removeAttribute("aria-busy");
  }
}

// --- events --------------------------------------------------------------------------------------------

const timeline = $("timeline");

function handle(event) {
  if (!event || typeof event.seq !== "number" || event.seq <= after) return; // seen already
  after = event.seq;
  const p = event.payload || {};
  switch (event.type) {
    case "usage":
      addUsage(p);
      break;
    case "status":
      setStatus(p.status, event.created);
      break;
    case "run_started":
      // A run claims every pending message.
      for (const badge of timeline.querySelectorAll(".ev-message .badge.pending")) badge.remove();
      setActive(true);
      break;
    case "message_injected":
    case "message_cancelled":
      // Picked by the running agent (a steer message) or withdrawn: no longer pending.
      for (const badge of timeline.querySelectorAll(`.ev-message[data-message="${Number(p.message_id)}"] .badge.pending`)) badge.remove();
      break;
    case "todo":
      showTodos(p.todos);
      break;
    case "sandbox_ready":
      showIsolationWarning(p);
      break;
    case "artifact_created":
      addArtifact(p);
      if (p.kind === "diff") loadDiff(p.artifact_id);
      break;
    case "tool_finished":
      if (finishTool(timeline, event, config.downloadUrl)) return;
      break;
    default:
  }
  const item = renderEvent(event, config.downloadUrl);
  if (item) {
    timeline.append(item);
    $("timeline-empty").hidden = true;
  }
}

new LiveConnection({
  socketUrl: () => socketUrl(`/ws/sessions/${config.id}/?after=${after}`),
  onFrame: (frame) => {
    if (frame.type === "event") handle(frame.event);
  },
  poll: async () => {
    const page = await getJson(`${config.eventsUrl}?after=${after}&limit=200`);
    for (const event of page.events) handle(event);
    return page.events.length === 200;
  },
  onState: (state, detail) => {
    connectionState = state;
    connectionDetail = detail;
    showConnectionState();
  },
  pollInterval: 2000,
}).start();

// --- follow-up messages ----------------------------------------------------------------------------

const form = $("followup");
if (form) {
  const textarea = $("followup-content");
  const error = $("followup-error");
  const showError = (messages) => {
    error.replaceChildren(...messages.map((m) => h("p", {}, m)));
    error.hidden = !messages.length;
    if (messages.length) textarea.setAttribute("aria-invalid", "true");
    else textarea.removeAttribute("aria-invalid");
  };
  form.addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    button.textContent = "Sending…";
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (response.status === 201) {
        textarea.value = "";
        showError([]);
      } else if (response.status === 400) {
        const body = await response.json();
        showError(body.errors?.content || ["The message was not accepted."]);
      } else if (response.status === 403) {
        showError(["You cannot send messages here (read-only access, or your session expired: reload the page)."]);
      } else {
        showError([`The server answered ${response.status}; try again.`]);
      }
    } catch (err) {
      showError(["Could not reach the server; check your connection and try again."]);
    } finally {
      button.disabled = false;
      button.textContent = "Send";
    }
  });
  textarea.addEventListener("keydown", (key) => {
    if (key.key === "Enter" && (key.ctrlKey || key.metaKey)) form.requestSubmit();
  });
}

// Keyboard users following the "Changes" link land on the section, not just scroll to it.
$("changes-link")?.addEventListener("click", () => setTimeout(() => $("changes").focus(), 0));

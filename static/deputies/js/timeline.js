// Live timeline entries. Mirrors templates/sessions/_item.html (the first paint) and
// sessions/web/timeline.py (what each event type shows); change them together.

import { formatSize, h, localTime } from "./util.js";

const SUMMARY_KEYS = ["command", "path", "pattern", "message", "summary"];

export function toolSummary(name, args) {
  if (!args || typeof args !== "object" || Array.isArray(args)) return String(args ?? "").slice(0, 160);
  if (name === "todo_write" && Array.isArray(args.todos)) return `${args.todos.length} items`;
  for (const key of SUMMARY_KEYS) if (typeof args[key] === "string") return args[key].slice(0, 160);
  for (const value of Object.values(args)) if (typeof value === "string") return value.slice(0, 160);
  return "";
}

function textBlock(text, tag = "div") {
  // Like Django's linebreaksbr: text with <br> for newlines, never HTML.
  const node = h(tag, { class: "text" });
  String(text ?? "").split("\n").forEach((line, i) => {
    if (i) node.append(h("br"));
    node.append(document.createTextNode(line));
  });
  return node;
}

function muted(...children) {
  return h("div", { class: "muted" }, ...children);
}

function toolState(state) {
  const label = state === "ok" ? "ok" : state === "error" ? "error" : "running…";
  return h("span", { class: `badge tool-${state}` }, label);
}

export function downloadLink(template, id, text) {
  return h("a", { href: template.replace("{id}", id) }, text);
}

function toolDetails(p, key) {
  const args = p.arguments === undefined ? "" : JSON.stringify(p.arguments, null, 2);
  return h(
    "details",
    { class: "tool" },
    h("summary", {}, h("span", { class: "tool-name" }, p.name || "tool"), " ", h("code", { class: "tool-arg" }, toolSummary(p.name, p.arguments)), " ", toolState("running")),
    h("div", { class: "tool-detail" }, args ? [h("h3", {}, "Arguments"), h("pre", {}, args)] : [], h("h3", {}, "Output"), h("pre", { class: "tool-output" }, "(running)")),
  );
}

/** Fill a tool entry with its result; returns false when its start is not on the page. */
export function finishTool(timeline, event, downloadUrl) {
  const p = event.payload || {};
  const key = `${event.run ?? ""}:${p.call_id ?? ""}`;
  const item = [...timeline.querySelectorAll("li.ev-tool")].find((li) => li.dataset.call === key);
  if (!item) return false;
  const state = p.ok ? "ok" : "error";
  item.querySelector(".tool-detail .tool-output").textContent = p.output || "(no output)";
  item.querySelector("summary .badge").replaceWith(toolState(state));
  if (p.truncated && p.artifact_id) {
    item.querySelector(".tool-detail").append(h("p", { class: "note" }, "Output shortened; ", downloadLink(downloadUrl, p.artifact_id, "download the full output"), "."));
  }
  return true;
}

function body(event, downloadUrl) {
  const p = event.payload || {};
  switch (event.type) {
    case "message": {
      const kind = p.position === 1 ? "Prompt" : p.steer ? "Steer" : "Follow-up";
      const title = p.steer ? "Delivered to the running agent before its next step" : "Waiting for the next run to pick it up";
      const label = h("div", { class: "ev-label" }, kind, " ", h("span", { class: "badge pending", title }, "pending"));
      return ["message", [label, textBlock(p.content)]];
    }
    case "child_spawned":
      return ["progress", [h("div", { class: "ev-label" }, "Progress"), textBlock(`Started child session #${p.session_id}: ${p.title || ""} (${p.model || ""})`)]];
    case "message_injected":
      return ["progress", [h("div", { class: "ev-label" }, "Progress"), textBlock(`Steer message #${p.position} delivered to the running agent`)]];
    case "message_edited":
      return ["progress", [muted(`A pending follow-up was edited: ${p.content || ""}`)]];
    case "message_cancelled":
      return ["progress", [muted(`Follow-up #${p.position} was cancelled before a run picked it`)]];
    case "assistant_text":
      return ["assistant", [h("div", { class: "ev-label" }, "Agent"), textBlock(p.text)]];
    case "tool_started":
      return ["tool", [toolDetails(p)]];
    case "tool_finished": {
      // Its start is not on the page (an older, unrendered event): show the result on its own.
      const details = toolDetails({ name: p.name });
      details.querySelector(".tool-output").textContent = p.output || "(no output)";
      details.querySelector("summary .badge").replaceWith(toolState(p.ok ? "ok" : "error"));
      return ["tool", [details]];
    }
    case "todo": {
      const todos = Array.isArray(p.todos) ? p.todos : [];
      const done = todos.filter((t) => t && t.status === "completed").length;
      return ["todo", [muted(`Plan updated: ${done}/${todos.length} done`)]];
    }
    case "progress":
      return ["progress", [h("div", { class: "ev-label" }, "Progress"), textBlock(p.message)]];
    case "setup_output":
      return ["progress", [h("div", { class: "ev-label" }, "Setup"), textBlock(`(${p.stream || "stdout"}) ${p.text || ""}`)]];
    case "setup_finished":
    {
      const what = String(p.script || "setup");
      return ["progress", [muted(`${what.charAt(0).toUpperCase()}${what.slice(1)} finished with exit code ${p.exit_code} in ${p.duration} s`)]];
    }
    case "run_requeued":
      return ["progress", [muted("Run queued again: its worker was lost")]];
    case "callback_sent":
      return ["progress", [muted(`Callback delivered to ${p.target || ""} (HTTP ${p.status_code}, attempt ${p.attempt})`)]];
    case "callback_failed":
    {
      const then = p.will_retry ? `retrying in ${p.retry_in} s` : "giving up";
      return ["progress", [muted(`Callback to ${p.target || ""} failed (attempt ${p.attempt}): ${p.error || ""}; ${then}`)]];
    }
    case "mcp_unavailable":
      return ["progress", [muted(`MCP server ${p.server || ""} unavailable, its tools are left out: ${p.error || ""}`)]];
    case "branch_pushed":
      return ["progress", [muted(`Pushed ${String(p.commit || "").slice(0, 10)} to ${p.branch || ""}`)]];
    case "pull_request":
      return ["progress", [muted(`Pull request: ${p.url || ""}`)]];
    case "run_resumed":
      return ["progress", [muted(`Run resumed (attempt ${p.attempt}) from step ${p.from_step}, sandbox ${p.sandbox}`)]];
    case "workspace_restored":
      return ["progress", [muted(`Workspace restored from the saved work (artifact ${p.artifact_id}): ${p.changed} files changed, ${p.deleted} deleted`)]];
    case "context_compacted":
      return ["progress", [muted(`Conversation compacted: ${p.elided} older outputs elided (${p.chars_before} → ${p.chars_after} characters)`)]];
    case "status":
      return ["status", [muted("Status ", h("span", { class: `badge status-${p.status}` }, p.status))]];
    case "run_started":
      return ["run", [muted(`Run ${p.attempt ?? ""} started`)]];
    case "sandbox_ready":
      return ["sandbox", [
        muted(`Sandbox ready (${p.provider || ""})`, p.isolated ? "" : [" — ", h("strong", { class: "warn-text" }, "not isolated"), p.reason ? `: ${p.reason}` : ""]),
        (p.secrets_withheld || []).length ? muted(h("strong", { class: "warn-text" }, "Secrets withheld"), ` (${p.secrets_withheld.join(", ")}): ${p.secrets_withheld_reason || ""}`) : "",
      ]];
    case "repository_ready":
      return ["repository", [muted(`Checked out ${p.base_branch || ""} at `, h("code", {}, String(p.commit || "").slice(0, 10)), " on branch ", h("code", {}, p.branch || ""))]];
    case "artifact_created":
      return ["artifact", [muted("Artifact ", p.artifact_id ? downloadLink(downloadUrl, p.artifact_id, p.name) : p.name, ` (${p.kind}, ${formatSize(p.size)})`)]];
    case "run_completed":
      return ["completed", [h("div", { class: "ev-label" }, "Run completed"), textBlock(p.summary)]];
    case "run_failed":
    case "llm_error":
      return ["error", [h("div", { class: "ev-label" }, p.will_retry ? "Model error, retrying" : "Error"), h("pre", { class: "text" }, p.error || "")]];
    default:
      return null; // usage changes the totals; unknown types are skipped
  }
}

/** The <li> for an event, or null for events that do not show in the timeline. */
export function renderEvent(event, downloadUrl) {
  const made = body(event, downloadUrl);
  if (!made) return null;
  const [kind, children] = made;
  const attrs = { class: `ev ev-${kind} new`, "data-seq": event.seq };
  if (kind === "tool") attrs["data-call"] = `${event.run ?? ""}:${(event.payload || {}).call_id ?? ""}`;
  if (event.type === "message") attrs["data-message"] = (event.payload || {}).message_id ?? "";
  return h("li", attrs, h("time", { class: "ev-time", datetime: event.created }, localTime(event.created)), h("div", { class: "ev-body" }, ...children));
}

"""Events turned into timeline items for the first paint of the session page.

``static/deputies/js/timeline.js`` renders live events with the same markup; keep the two in step
(the kinds, the CSS classes and what a tool call's one-line summary shows).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sessions.models import Event, SessionStatus

TERMINAL = (
    SessionStatus.COMPLETED,
    SessionStatus.FAILED,
    SessionStatus.CANCELLED,
    SessionStatus.ARCHIVED,
)
SUMMARY_KEYS = ("command", "path", "pattern", "message", "summary")


def tool_summary(name: str, arguments: Any) -> str:
    """The one argument worth showing next to the tool's name."""
    if not isinstance(arguments, dict):
        return str(arguments)[:160]
    if name == "todo_write" and isinstance(arguments.get("todos"), list):
        return f"{len(arguments['todos'])} items"
    for key in SUMMARY_KEYS:
        if isinstance(arguments.get(key), str):
            return arguments[key][:160]
    for value in arguments.values():
        if isinstance(value, str):
            return value[:160]
    return ""


def notice_text(type: str, p: dict) -> str:
    """Setup output and recoveries read as progress notes (same wording as static/deputies/js/timeline.js)."""
    if type == "setup_output":
        return f"Setup ({p.get('stream', 'stdout')}): {p.get('text', '')}"
    if type == "setup_finished":
        what = str(p.get("script") or "setup")
        return f"{what[:1].upper()}{what[1:]} finished with exit code {p.get('exit_code')} in {p.get('duration')} s"
    if type == "context_compacted":
        return (
            f"Conversation compacted: {p.get('elided')} older outputs elided "
            f"({p.get('chars_before')} → {p.get('chars_after')} characters)"
        )
    if type == "mcp_unavailable":
        return f"MCP server {p.get('server', '')} unavailable, its tools are left out: {p.get('error', '')}"
    if type == "child_spawned":
        return f"Started child session #{p.get('session_id')}: {p.get('title', '')} ({p.get('model', '')})"
    if type == "callback_sent":
        what = {"slack": "Slack message", "github": "GitHub reply"}.get(p.get("kind", ""), "Callback")
        return f"{what} delivered to {p.get('target', '')} (HTTP {p.get('status_code')}, attempt {p.get('attempt')})"
    if type == "callback_failed":
        what = {"slack": "Slack message", "github": "GitHub reply"}.get(p.get("kind", ""), "Callback")
        then = f"retrying in {p.get('retry_in')} s" if p.get("will_retry") else "giving up"
        return f"{what} to {p.get('target', '')} failed (attempt {p.get('attempt')}): {p.get('error', '')}; {then}"
    if type == "branch_pushed":
        return f"Pushed {str(p.get('commit', ''))[:10]} to {p.get('branch', '')}"
    if type == "pull_request":
        return f"Pull request: {p.get('url', '')}"
    if type == "run_resumed":
        return f"Run resumed (attempt {p.get('attempt')}) from step {p.get('from_step')}, sandbox {p.get('sandbox')}"
    if type == "workspace_restored":
        return (
            f"Workspace restored from the saved work (artifact {p.get('artifact_id')}): "
            f"{p.get('changed')} files changed, {p.get('deleted')} deleted"
        )
    return "Run queued again: its worker was lost"


def todo_counts(todos: list[dict]) -> tuple[int, int]:
    return sum(1 for t in todos if t.get("status") == "completed"), len(todos)


@dataclass
class Item:
    kind: str
    seq: int
    created: datetime
    data: dict[str, Any] = field(default_factory=dict)


def build_timeline(events: Iterable[Event], pending_message_ids: set[int]) -> list[Item]:
    items: list[Item] = []
    tools: dict[tuple[int | None, str], Item] = {}
    messages: dict[Any, Item] = {}  # message id -> its item, for edits, cancels and injections
    for event in events:
        p = event.payload if isinstance(event.payload, dict) else {}
        t = event.type
        item: Item | None = None
        if t == "message":
            item = Item(
                "message",
                event.seq,
                event.created,
                {
                    "id": p.get("message_id"),
                    "content": p.get("content", ""),
                    "position": p.get("position"),
                    "pending": p.get("message_id") in pending_message_ids,
                    "steer": bool(p.get("steer")),
                },
            )
            messages[p.get("message_id")] = item
        elif t == "message_edited" and (edited := messages.get(p.get("message_id"))) is not None:
            edited.data.update(content=p.get("content", ""), edited=True)
        elif t == "message_cancelled" and (withdrawn := messages.get(p.get("message_id"))) is not None:
            withdrawn.data.update(cancelled=True, pending=False)
        elif t == "message_injected":
            if (steered := messages.get(p.get("message_id"))) is not None:
                steered.data["pending"] = False
            item = Item(
                "progress",
                event.seq,
                event.created,
                {"message": f"Steer message #{p.get('position')} delivered to the running agent"},
            )
        elif t == "assistant_text":
            item = Item("assistant", event.seq, event.created, {"text": p.get("text", "")})
        elif t == "tool_started":
            arguments = p.get("arguments")
            item = Item(
                "tool",
                event.seq,
                event.created,
                {
                    "key": f"{event.run_id or ''}:{p.get('call_id', '')}",
                    "name": p.get("name", "tool"),
                    "summary": tool_summary(p.get("name", ""), arguments),
                    "arguments": json.dumps(arguments, indent=2, ensure_ascii=False),
                    "state": "running",
                    "output": "",
                },
            )
            tools[(event.run_id, p.get("call_id", ""))] = item
        elif t == "tool_finished":
            started = tools.get((event.run_id, p.get("call_id", "")))
            if started is None:  # a finish without its start: show it on its own
                started = item = Item(
                    "tool",
                    event.seq,
                    event.created,
                    {
                        "key": f"{event.run_id or ''}:{p.get('call_id', '')}",
                        "name": p.get("name", "tool"),
                        "summary": "",
                        "arguments": "",
                    },
                )
            started.data.update(
                state="ok" if p.get("ok") else "error",
                output=p.get("output", ""),
                truncated=bool(p.get("truncated")),
                artifact_id=p.get("artifact_id"),
            )
        elif t == "todo":
            todos = [x for x in p.get("todos", []) if isinstance(x, dict)]
            done, total = todo_counts(todos)
            item = Item("todo", event.seq, event.created, {"todos": todos, "done": done, "total": total})
        elif t == "progress":
            item = Item("progress", event.seq, event.created, {"message": p.get("message", "")})
        elif t in (
            "setup_output",
            "setup_finished",
            "run_requeued",
            "run_resumed",
            "workspace_restored",
            "context_compacted",
            "callback_sent",
            "callback_failed",
            "mcp_unavailable",
            "branch_pushed",
            "pull_request",
            "child_spawned",
        ):
            item = Item("progress", event.seq, event.created, {"message": notice_text(t, p)})
        elif t == "status":
            item = Item("status", event.seq, event.created, {"status": p.get("status", "")})
        elif t == "run_started":
            item = Item("run", event.seq, event.created, {"attempt": p.get("attempt")})
            for previous in items:  # a run claims every pending message
                if previous.kind == "message" and not previous.data.get("cancelled"):
                    previous.data["pending"] = False
        elif t == "sandbox_ready":
            item = Item(
                "sandbox",
                event.seq,
                event.created,
                {
                    "provider": p.get("provider", ""),
                    "isolated": p.get("isolated"),
                    "reason": p.get("reason"),
                    "secrets_withheld": p.get("secrets_withheld") or [],
                    "secrets_withheld_reason": p.get("secrets_withheld_reason", ""),
                },
            )
        elif t == "repository_ready":
            item = Item(
                "repository",
                event.seq,
                event.created,
                {
                    "base_branch": p.get("base_branch", ""),
                    "branch": p.get("branch", ""),
                    "commit": str(p.get("commit", ""))[:10],
                },
            )
        elif t == "artifact_created":
            item = Item(
                "artifact",
                event.seq,
                event.created,
                {
                    "id": p.get("artifact_id"),
                    "kind": p.get("kind"),
                    "name": p.get("name"),
                    "size": p.get("size"),
                },
            )
        elif t == "run_completed":
            item = Item("completed", event.seq, event.created, {"summary": p.get("summary", "")})
        elif t in ("run_failed", "llm_error"):
            item = Item(
                "error",
                event.seq,
                event.created,
                {"error": p.get("error", ""), "will_retry": bool(p.get("will_retry"))},
            )
        # usage events change the totals, not the timeline; unknown types are skipped.
        if item is not None:
            items.append(item)
    return items


def latest_todos(items: list[Item]) -> list[dict]:
    for item in reversed(items):
        if item.kind == "todo":
            return item.data["todos"]
    return []

"""What Deputies says in Slack, as Block Kit: the thread's first message (slash commands), the status
message (edited as the plan advances), the end-of-run message, and the buttons on them.

The status message is rendered when its delivery is sent, from the rows (session, run, last ``todo``
event), so an edit that waited (a 429, Slack down) shows the state of then, not of when it was queued.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.urls import reverse
from django.utils import timezone

CANCEL = "deputies_cancel"
RETRY = "deputies_retry"
TODO_MARKS = {
    "completed": ":white_check_mark:",
    "in_progress": ":arrow_forward:",
    "pending": ":white_circle:",
}
STATUS_MARKS = {
    "queued": ":inbox_tray: Queued",
    "running": ":hourglass_flowing_sand: Running",
    "idle": ":white_check_mark: Done",
    "completed": ":white_check_mark: Done",
    "failed": ":x: Failed",
    "cancelled": ":no_entry_sign: Cancelled",
    "archived": ":file_cabinet: Archived",
}
MAX_FILES = 10
MAX_TEXT = 2900  # a section's text may be 3000 characters


def dashboard_url(session_id: int) -> str:
    return settings.BASE_URL.rstrip("/") + reverse("session-detail", args=[session_id])


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def escape(text: str) -> str:
    """Slack's three control characters in mrkdwn."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def elapsed(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _button(text: str, action_id: str, value: str, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {"type": "button", "text": {"type": "plain_text", "text": text},
                              "action_id": action_id, "value": value}  # fmt: skip
    if style:
        button["style"] = style
    return button


def _link_button(session_id: int) -> dict[str, Any]:
    return {"type": "button", "text": {"type": "plain_text", "text": "Open in Deputies"},
            "url": dashboard_url(session_id), "action_id": "deputies_open"}  # fmt: skip


def root(session, requester: str, prompt: str) -> dict[str, Any]:
    """The slash command's message in the channel: the thread everything else goes into."""
    text = f"<@{requester}> asked Deputies: {clip(escape(prompt), 2000)}"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text":
                f"*{escape(session.repository.name)}* · `{escape(session.model)}` · "
                f"<{dashboard_url(session.pk)}|session {session.pk}> · reply in this thread to steer it"}]},
        ],
    }  # fmt: skip


def status(session) -> dict[str, Any]:
    """The status message, from the rows as they are now."""
    from sessions.models import Event, Run

    run = session.runs.order_by("-attempt", "-pk").first()
    state = session.status
    if run is not None and run.status in Run.ACTIVE:
        state = "running" if run.status == Run.Status.RUNNING else "queued"
    line = f"*<{dashboard_url(session.pk)}|{escape(session.title or f'Session {session.pk}')}>*\n{STATUS_MARKS.get(state, state)}"
    if run is not None and run.started:
        end = run.finished or timezone.now()
        line += f" · {elapsed((end - run.started).total_seconds())}"
        if session.runs.count() > 1:
            line += f" · run {run.attempt}"
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": clip(line)}}]
    todo = (
        Event.objects.filter(session=session, type="todo")
        .order_by("-seq")
        .values_list("payload", flat=True)
        .first()
    )
    todos = (todo or {}).get("todos") or []
    if todos:
        lines = [f"{TODO_MARKS.get(t.get('status'), '•')} {escape(str(t.get('content', '')))}" for t in todos]
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": clip("\n".join(lines))}})
    actions = [_link_button(session.pk)]
    if state in ("queued", "running"):
        actions.insert(0, _button("Cancel", CANCEL, str(session.pk), "danger"))
    elif state in ("failed", "cancelled"):
        actions.insert(0, _button("Retry", RETRY, str(session.pk), "primary"))
    blocks.append({"type": "actions", "elements": actions})
    done = sum(1 for t in todos if t.get("status") == "completed")
    text = f"{STATUS_MARKS.get(state, state)}: {session.title}" + (f" ({done}/{len(todos)})" if todos else "")
    return {"text": text, "blocks": blocks, "state": state}


def final(payload: dict[str, Any]) -> dict[str, Any]:
    """The end of a run, from the same payload HTTP callbacks get (deliveries.receivers.run_payload)."""
    session, run, cost = payload["session"], payload["run"], payload["cost"]
    status = run["status"]
    url = payload["links"]["session"]
    head = {"completed": ":white_check_mark: *Done*", "failed": ":x: *Failed*",
            "cancelled": ":no_entry_sign: *Cancelled*"}.get(status, status)  # fmt: skip
    blocks: list[dict[str, Any]] = []
    body = head
    if status == "completed" and payload.get("summary"):
        body += "\n" + escape(payload["summary"])
    elif run.get("error"):
        body += "\n" + escape(run["error"])
    blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": clip(body)}})
    diff = payload.get("diff")
    if diff and diff.get("files"):
        files = diff["files"]
        lines = [f"`{escape(f['path'])}` +{f['additions']} −{f['deletions']}" for f in files[:MAX_FILES]]
        if len(files) > MAX_FILES:
            lines.append(f"…and {len(files) - MAX_FILES} more")
        lines.insert(
            0,
            f"*{len(files)} file{'s' if len(files) != 1 else ''} changed* (+{diff['additions']} −{diff['deletions']})",
        )
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": clip("\n".join(lines))}})
    context = [f"Cost ${float(cost['run_usd']):.4f} this run, ${float(cost['usd']):.4f} in all"]
    if session.get("pull_request_url"):
        context.append(f"<{session['pull_request_url']}|Pull request>")
    context.append(f"<{url}|Open in Deputies>")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]})
    actions = [_link_button(session["id"])]
    if status in ("failed", "cancelled"):
        actions.insert(0, _button("Retry", RETRY, str(session["id"]), "primary"))
    if session.get("pull_request_url"):
        actions.append({"type": "button", "text": {"type": "plain_text", "text": "Pull request"},
                        "url": session["pull_request_url"], "action_id": "deputies_pr"})  # fmt: skip
    blocks.append({"type": "actions", "elements": actions})
    text = {"completed": "Done", "failed": "Failed", "cancelled": "Cancelled"}.get(status, status)
    summary = payload.get("summary") or run.get("error") or ""
    return {"text": clip(f"{text}: {summary}" if summary else text, 3000), "blocks": blocks}


def queued_answer(session, follow_up: bool = False) -> dict[str, Any]:
    """The ephemeral acknowledgement of a slash command."""
    what = "Follow-up queued" if follow_up else "Queued"
    text = (
        f":inbox_tray: {what}: *{escape(session.title)}* on *{escape(session.repository.name)}*. "
        f"Follow it in the thread, or <{dashboard_url(session.pk)}|in Deputies>."
    )
    return {"response_type": "ephemeral", "text": text}


def usage() -> str:
    c = settings.SLACK_COMMAND
    return (
        f"Usage: `{c} [repository] <what to do>`: the repository as `owner/name` or its name in "
        "Deputies, or left out to use the channel's default. Or mention @Deputies with the prompt; "
        "reply in its thread to steer it."
    )

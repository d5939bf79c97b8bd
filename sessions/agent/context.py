"""Keeps a long conversation inside the model's context window.

A session that runs for many steps, or comes back for follow-ups, grows without bound; providers
answer an oversized request with an error, which would end the session for good. Before every model
call the loop asks ``compact`` to bring the conversation under ``DEPUTIES_CONTEXT_CHARS``. It elides
the bulkiest and least useful part first -- old tool output -- then old assistant prose, oldest first,
down to three quarters of the budget (so it does not run again at the very next step). It never
touches the system prompt, any user message, the tool calls themselves (the conversation stays a
valid one: every call keeps its answer message) or the most recent ``KEEP_RECENT`` messages.
The elided text stays in the session's events and artifacts; only the model stops seeing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEEP_RECENT = 8
MIN_ELIDABLE = 200  # shorter contents cost less than the marker that would replace them
TARGET = 0.75


@dataclass(frozen=True)
class Compaction:
    elided: int
    chars_before: int
    chars_after: int


def message_size(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        size = len(content)
    elif isinstance(content, list):
        size = sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    else:
        size = 0
    for call in message.get("tool_calls") or []:
        size += len(str(call.get("function", {}).get("arguments", "")))
    return size


def transcript_size(messages: list[dict[str, Any]]) -> int:
    return sum(message_size(m) for m in messages)


def _marker(role: str, size: int) -> str:
    what = "tool output" if role == "tool" else "assistant text"
    return (
        f"[{size} characters of earlier {what} elided to keep the conversation within the context "
        "budget; the session's events still have it. Run the command again if you need it.]"
    )


def compact(messages: list[dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], Compaction | None]:
    """A copy of ``messages`` within ``budget`` characters where possible, and what was done."""
    before = transcript_size(messages)
    if before <= budget:
        return messages, None
    target = int(budget * TARGET)
    result = list(messages)
    size = before
    elided = 0
    last_elidable = len(result) - KEEP_RECENT
    for role in ("tool", "assistant"):
        for i in range(1, max(last_elidable, 1)):
            if size <= target:
                break
            message = result[i]
            content = message.get("content")
            if message.get("role") != role or not isinstance(content, str) or len(content) < MIN_ELIDABLE:
                continue
            if content.startswith("[") and "elided to keep the conversation" in content:
                continue
            replacement = _marker(role, len(content))
            result[i] = {**message, "content": replacement}
            size -= len(content) - len(replacement)
            elided += 1
    if not elided:
        return messages, None
    return result, Compaction(elided, before, size)

"""Agent tools. Contract (used by sessions/agent/loop.py); implementation in progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ToolError(Exception):
    """Bad arguments or a refused operation; reported to the model as a tool error, never fatal."""


@dataclass
class ToolResult:
    ok: bool
    output: str  # full text; the loop truncates it for the model and keeps the rest as an artifact
    finished: bool = False  # the `finish` tool was called
    summary: str | None = None  # finish{summary}
    todos: list[dict[str, str]] | None = None  # todo_write{todos}
    progress: str | None = None  # report_progress{message}
    extra: dict[str, Any] = field(default_factory=dict)


# OpenAI-style function specs: [{"name", "description", "parameters": <JSON schema>}]
TOOL_SPECS: list[dict[str, Any]] = []


def execute_tool(handle, name: str, arguments: dict[str, Any] | str, on_output=None) -> ToolResult:
    raise ToolError(f"unknown tool {name!r}")

"""The system prompt. Kept short: the tool specs already describe each tool's arguments."""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = """\
You are Deputies, an autonomous software engineer working in a sandbox on one repository.
Nobody is watching live: work on your own until the task is done, then call `finish`.

Workspace: {workspace} (the repository, checked out on branch `{branch}` from `{base_branch}`).
Repository: {repository}
Tools: {tools}

How to work:
- Paths are relative to the workspace. Read code before changing it; keep changes minimal and in
  the style of the surrounding code.
- Plan multi-step work with `todo_write` and keep it current; use `report_progress` for short
  updates a person would want to see.
- Run the project's tests or checks with `bash` when they exist, and fix what you broke.
- Do not commit, push or create branches: Deputies collects your changes as a diff and publishes them.
- Tool output may be truncated; narrow your command (grep, head, tail) when it is.
- When done, call `finish` with a short summary of what you changed and why, and anything left open.
"""


def build_system_prompt(session: Any, handle: Any, toolset: Any = None) -> str:
    """The first message of a session's conversation; follow-up runs reuse the stored transcript.

    ``toolset`` (sessions/agent/toolset.py): the tools to name, and what the run adds to the prompt
    (the skills' descriptions, the agent profile's instructions), after the general rules.
    """
    from sessions.agent.tools import TOOL_SPECS

    specs = toolset.specs if toolset is not None else TOOL_SPECS
    tools = ", ".join(f"`{spec['name']}`" for spec in specs) or "(none)"
    repository = getattr(session, "repository", None)
    prompt = SYSTEM_PROMPT.format(
        workspace=getattr(handle, "workspace", ".") or ".",
        branch=session.branch or "(working branch)",
        base_branch=session.base_branch or "(default branch)",
        repository=getattr(repository, "name", "") or "(unnamed)",
        tools=tools,
    )
    if not any(spec["name"] == "bash" for spec in specs):  # a profile without bash
        prompt = "\n".join(line for line in prompt.split("\n") if "with `bash`" not in line)
    for section in toolset.prompt_sections if toolset is not None else []:
        prompt += f"\n{section}\n"
    return prompt

"""The tools one run's model is offered, and how each call is carried out.

A run's toolset is the built-in workspace tools (sessions/agent/tools.py) plus the worker tools
registered there (skills, web, ...) plus the tools of the team's MCP servers, all filtered by the
session's agent profile: a tool the profile does not allow is not in the list the model is sent,
and a call to it anyway is refused like any unknown tool.

Worker tools run in the worker, never in the sandbox; what they return passes through the run's
secrets redactor, as sandbox output does (sessions/secrets.py ``RedactingHandle``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from sessions.agent.tools import (
    TOOL_SPECS,
    WORKER_TOOLS,
    ToolError,
    ToolResult,
    execute_tool,
    parse_arguments,
)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], ToolResult]


@dataclass
class RunContext:
    """What worker tools may use: the run, its session, its secrets (for MCP headers) and skills."""

    run: Any = None
    session: Any = None
    handle: Any = None
    redactor: Any = None
    checkout: Path | None = None
    profile: Any = None
    secrets: dict[str, str] = field(default_factory=dict)
    skills: dict[str, Any] = field(default_factory=dict)  # name -> sessions/agent/skills.py SkillDoc
    emit: Callable[[str, dict[str, Any]], None] | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run when the run's loop ends


class Toolset:
    def __init__(
        self,
        specs: list[dict[str, Any]],
        handlers: dict[str, Handler] | None = None,
        *,
        redactor: Any = None,
        max_steps: int | None = None,
        prompt_sections: list[str] | None = None,
        loose: frozenset[str] = frozenset(),
        cleanups: list[Callable[[], None]] | None = None,
    ) -> None:
        self.specs = specs
        self.by_name = {spec["name"]: spec for spec in specs}
        self.handlers = handlers or {}
        self.redactor = redactor
        self.max_steps = max_steps
        self.prompt_sections = prompt_sections or []
        self.loose = loose  # tools whose arguments the far side validates (MCP)
        self.cleanups = cleanups or []

    def __enter__(self) -> Toolset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of what the tools hold for the run (its MCP sessions)."""
        while self.cleanups:
            cleanup = self.cleanups.pop()
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - one tool's clean-up does not stop the others'
                log.exception("closing a worker tool failed")

    @classmethod
    def builtin(cls) -> Toolset:
        """The workspace tools only: what a loop started without a run context offers."""
        return cls(list(TOOL_SPECS))

    @property
    def names(self) -> list[str]:
        return [spec["name"] for spec in self.specs]

    def execute(self, handle: Any, name: str, arguments: dict[str, Any] | str) -> ToolResult:
        spec = self.by_name.get(name)
        if spec is None:
            raise ToolError(f"unknown tool {name!r}; available tools: {', '.join(self.names) or 'none'}")
        handler = self.handlers.get(name)
        if handler is None:
            return execute_tool(handle, name, arguments)
        check = {**spec, "parameters": {}} if name in self.loose else spec
        args = parse_arguments(name, arguments, check)
        try:
            result = handler(args)
        except ToolError as exc:
            raise ToolError(self.scrub(str(exc))) from None
        except Exception as exc:  # a worker tool's own failure is the model's to read, not the run's end
            log.exception("worker tool %s failed", name)
            raise ToolError(self.scrub(f"{name} failed: {type(exc).__name__}: {exc}")) from None
        result.output = self.scrub(result.output or "")
        return result

    def scrub(self, text: str) -> str:
        return self.redactor.text(text) if self.redactor else text


def build_toolset(
    run: Any,
    handle: Any,
    redactor: Any = None,
    checkout: Path | None = None,
    emit: Callable[[str, dict[str, Any]], None] | None = None,
) -> Toolset:
    """The toolset of one run of ``run.session``, shaped by its agent profile."""
    from sessions.agent import mcp, skills

    session = run.session
    profile = session.profile if session.profile_id else None
    context = RunContext(
        run=run,
        session=session,
        handle=handle,
        redactor=redactor,
        checkout=checkout,
        profile=profile,
        emit=emit,
    )

    def allowed(name: str) -> bool:
        return profile is None or profile.allows_tool(name)

    specs = [spec for spec in TOOL_SPECS if allowed(spec["name"])]
    handlers: dict[str, Handler] = {}
    context.skills = {
        name: doc
        for name, doc in skills.collect(context).items()
        if profile is None or profile.allows_skill(name)
    }
    for name, tool in WORKER_TOOLS.items():
        if allowed(name) and tool.offered(context):
            specs.append(tool.spec)
            handlers[name] = _bind(tool.run, context)
    loose = set()
    # The claim saw whether the team has MCP servers (Run.claim_loaded); the deployment's own count too.
    servers = settings.MCP_SERVERS or getattr(run, "team_mcp_servers", None) is not False
    for spec, handler in mcp.discover(context) if servers else ():
        if allowed(spec["name"]):
            specs.append(spec)
            handlers[spec["name"]] = handler
            loose.add(spec["name"])
    sections = []
    if context.skills and "load_skill" in handlers:
        sections.append(skills.prompt_section(context.skills))
    if profile is not None and profile.system_prompt.strip():
        sections.append(profile.system_prompt.strip())
    return Toolset(
        specs,
        handlers,
        redactor=redactor,
        max_steps=profile.max_steps if profile is not None else None,
        prompt_sections=sections,
        loose=frozenset(loose),
        cleanups=context.cleanups,
    )


def _bind(run: Callable[[Any, dict[str, Any]], ToolResult], context: RunContext) -> Handler:
    return lambda args: run(context, args)


# Registering the worker tools is importing their modules.
from sessions.agent import skills as _skills  # noqa: E402, F401
from sessions.agent import web as _web  # noqa: E402, F401

"""What shapes an agent beyond its workspace tools: profiles, skills, MCP servers, cached web results.

Kept out of sessions/models.py (already past the size where a module should split); the models
belong to the same app and are imported at the end of sessions/models.py, so
``from sessions.models import Skill`` works like for every other model.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from sessions.revisions import Revisioned

NAME_RE = r"[a-z0-9][a-z0-9_-]{0,63}"
name_validator = RegexValidator(
    f"^{NAME_RE}$", "Lower-case letters, digits, '-' and '_', starting with a letter or a digit."
)
# MCP tools reach the model as ``server__tool``: a server name may not contain the separator.
MCP_NAME_RE = r"[a-z0-9](?:[a-z0-9-]|_(?!_)){0,39}"
mcp_name_validator = RegexValidator(
    f"^{MCP_NAME_RE}$", "Lower-case letters, digits, '-' and single '_' (no '__'), at most 40."
)


class AgentProfile(models.Model):
    """A named bundle of how an agent works: its model, what it may use, how far it may go.

    Chosen per session; else the environment's default; else the team's. Every field is optional:
    empty means "what the session would have had without a profile".
    """

    team = models.ForeignKey("agent_sessions.Team", models.CASCADE, related_name="agent_profiles")
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=300, blank=True)
    model = models.CharField(
        max_length=200, blank=True, help_text="provider/model. Empty: the environment's, then the default."
    )
    summary_model = models.CharField(
        max_length=200,
        blank=True,
        help_text="The cheaper model for titles and summaries. Empty: DEPUTIES_SUMMARY_MODEL.",
    )
    system_prompt = models.TextField(blank=True, help_text="Appended to the system prompt.")
    allowed_tools = models.JSONField(
        default=list, blank=True, help_text="Tool names the model is offered. Empty: every tool."
    )
    skills = models.JSONField(
        default=list, blank=True, help_text="Skill names the model is offered. Empty: every skill."
    )
    max_steps = models.PositiveIntegerField(
        null=True, blank=True, help_text="Model calls per run. Empty: DEPUTIES_AGENT_MAX_STEPS."
    )
    budget_usd = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="A new session's budget when none is given. Empty: DEPUTIES_SESSION_BUDGET_USD.",
    )
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "agent_sessions"
        ordering = ["name"]
        verbose_name = "agent profile"
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="unique_agent_profile_name_per_team"),
        ]

    def __str__(self) -> str:
        return self.name

    def allows_tool(self, name: str) -> bool:
        """An MCP tool is allowed by its full name or by ``server__*``."""
        if not self.allowed_tools:
            return True
        if name in self.allowed_tools:
            return True
        server, sep, _ = name.partition("__")
        return bool(sep) and f"{server}__*" in self.allowed_tools

    def allows_skill(self, name: str) -> bool:
        return not self.skills or name in self.skills


class Skill(Revisioned, models.Model):
    """Markdown instructions the agent loads when it needs them (the ``load_skill`` tool).

    Team-wide (no owner) or personal (only the owner's sessions see it, and it wins over a team
    skill of the same name). Every edit is a new revision, like environments.
    """

    team = models.ForeignKey("agent_sessions.Team", models.CASCADE, related_name="skills")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        models.CASCADE,
        null=True,
        blank=True,
        related_name="skills",
        help_text="Set: a personal skill. Empty: the whole team's.",
    )
    name = models.CharField(max_length=64, validators=[name_validator])
    description = models.CharField(
        max_length=300, help_text="One line the model reads to decide whether to load the skill."
    )
    body = models.TextField(help_text="Markdown; what load_skill returns.")
    revision = models.PositiveIntegerField(default=1)
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "agent_sessions"
        ordering = ["name", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["team", "name"], condition=Q(owner__isnull=True), name="unique_team_skill_name"
            ),
            models.UniqueConstraint(
                fields=["team", "owner", "name"],
                condition=Q(owner__isnull=False),
                name="unique_personal_skill_name",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} (r{self.revision})"

    @property
    def scope(self) -> str:
        return "personal" if self.owner_id else "team"


class McpServer(models.Model):
    """A remote MCP server (streamable HTTP) whose tools a team's agents may call through the worker.

    Header values may name secrets of the session's environment as ``${NAME}``; they are filled in
    by the worker for each call and never stored, shown or sent to the sandbox.
    """

    team = models.ForeignKey("agent_sessions.Team", models.CASCADE, related_name="mcp_servers")
    name = models.CharField(
        max_length=40, validators=[mcp_name_validator], help_text="Tools appear as NAME__tool."
    )
    url = models.CharField(max_length=1000, help_text="The server's streamable HTTP endpoint (http/https).")
    headers = models.JSONField(
        default=dict,
        blank=True,
        help_text='Sent with every request, e.g. {"Authorization": "Bearer ${MCP_TOKEN}"}; ${NAME} is '
        "the secret NAME of the session's environment.",
    )
    enabled = models.BooleanField(default=True, help_text="Off: its tools are not offered to new runs.")
    timeout_seconds = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="How long one call may take. Empty: DEPUTIES_MCP_TIMEOUT.",
    )
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "agent_sessions"
        ordering = ["name"]
        verbose_name = "MCP server"
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="unique_mcp_server_name_per_team"),
        ]

    def __str__(self) -> str:
        return self.name

    def as_config(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "headers": dict(self.headers or {})}


class WebResult(models.Model):
    """A web page or search a session already fetched: the same request in the same session is
    answered from here (cheaper, and the agent sees the same text twice)."""

    class Kind(models.TextChoices):
        FETCH = "fetch"
        SEARCH = "search"

    session = models.ForeignKey("agent_sessions.Session", models.CASCADE, related_name="web_results")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    key_hash = models.CharField(max_length=64)
    key = models.TextField()
    text = models.TextField()
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "agent_sessions"
        constraints = [
            models.UniqueConstraint(fields=["session", "kind", "key_hash"], name="unique_web_result"),
        ]

    @staticmethod
    def hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()


def clean_tool_names(names: Any) -> list[str]:
    """Validate a profile's ``allowed_tools`` (raises ValueError naming the bad entry)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("must be a list of tool names")
    from sessions.agent.tools import known_tool_names

    known = known_tool_names()
    for name in names:
        if name in known or re.fullmatch(rf"{MCP_NAME_RE}__(\*|[A-Za-z0-9_.-]+)", name):
            continue
        raise ValueError(
            f"unknown tool {name!r}; known tools: {', '.join(sorted(known))} (MCP tools: server__tool or server__*)"
        )
    return names

"""API shapes for what shapes an agent: agent profiles, skills, MCP servers (sessions/agent_models.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from sessions.agent import mcp
from sessions.agent_models import AgentProfile, McpServer, Skill, clean_tool_names
from sessions.api.serializers import StrictCharField, TeamField, TeamOwnedSerializer, clean_model


class AgentProfileSerializer(TeamOwnedSerializer):
    allowed_tools = serializers.JSONField(
        required=False,
        help_text='Tool names the model is offered, e.g. ["read_file", "grep", "finish", "docs__*"]. '
        "Empty: every tool. A tool left out is not sent to the model at all.",
    )
    skills = serializers.JSONField(
        required=False, help_text="Skill names the model is offered. Empty: every skill of the session."
    )

    class Meta:
        model = AgentProfile
        fields = [
            "id",
            "team",
            "name",
            "description",
            "model",
            "summary_model",
            "system_prompt",
            "allowed_tools",
            "skills",
            "max_steps",
            "budget_usd",
            "created",
            "updated",
        ]
        read_only_fields = ["created", "updated"]
        validators: list = []
        extra_kwargs = {"max_steps": {"min_value": 1}, "budget_usd": {"min_value": Decimal("0.01")}}

    def validate_model(self, value: str) -> str:
        return clean_model(value)

    def validate_summary_model(self, value: str) -> str:
        return clean_model(value)

    def validate_allowed_tools(self, value: Any) -> list[str]:
        try:
            return clean_tool_names(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_skills(self, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise serializers.ValidationError("must be a list of skill names")
        return value


class SkillSerializer(serializers.ModelSerializer):
    """Team skills (``personal`` false) or the requesting user's own (``personal`` true)."""

    team = TeamField(required=False)
    personal = serializers.BooleanField(
        required=False, default=False, help_text="Only your own sessions see a personal skill."
    )
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Skill
        fields = [
            "id",
            "team",
            "name",
            "description",
            "body",
            "personal",
            "owner",
            "revision",
            "created",
            "updated",
        ]
        read_only_fields = ["revision", "created", "updated"]
        validators: list = []

    def to_representation(self, instance: Skill) -> dict[str, Any]:
        data = super().to_representation(instance)
        data["personal"] = instance.owner_id is not None
        return data

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        team = self.instance.team if self.instance else self.context["team"]
        given = attrs.pop("team", None)
        if given is not None and given.pk != team.pk:
            raise serializers.ValidationError({"team": ["Skills do not move between teams."]})
        personal = attrs.pop("personal", None)
        if self.instance is not None:
            if personal is not None and personal != (self.instance.owner_id is not None):
                raise serializers.ValidationError({"personal": ["Cannot be changed; make a new skill."]})
            owner = self.instance.owner
        else:
            owner = self.context["request"].user if personal else None
            attrs["team"], attrs["owner"] = team, owner
        name = attrs.get("name", self.instance.name if self.instance else "")
        clash = Skill.objects.filter(team=team, name=name, owner=owner)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            whose = "You already have a personal" if owner else f"Team {team.slug!r} already has a"
            raise serializers.ValidationError({"name": [f"{whose} skill named {name!r}."]})
        return attrs


class McpServerSerializer(TeamOwnedSerializer):
    """A team's remote MCP server. Its headers name environment secrets as ${NAME}, never hold their
    values: the worker fills them in for each call, so no answer or page shows a credential."""

    headers = serializers.DictField(
        child=StrictCharField(max_length=4096, allow_blank=True),
        required=False,
        help_text='Sent with every request, e.g. {"Authorization": "Bearer ${MCP_TOKEN}"}: ${NAME} is '
        "the secret NAME of the session's environment (it must exist in one of the team's "
        "environments). A credential header (Authorization, *-Key, *-Token, Cookie) must name a secret.",
    )

    class Meta:
        model = McpServer
        fields = ["id", "team", "name", "url", "headers", "enabled", "timeout_seconds", "created", "updated"]
        read_only_fields = ["created", "updated"]
        validators: list = []
        extra_kwargs = {
            "name": {"help_text": "Its tools reach the model as NAME__tool; unique in the team."},
            "url": {
                "help_text": "The streamable HTTP endpoint (http or https), e.g. https://mcp.example.com/mcp."
            },
        }

    def validate_url(self, value: str) -> str:
        value = value.strip()
        if problem := mcp.url_problem(value):
            raise serializers.ValidationError(problem)
        return value

    def validate_headers(self, value: dict[str, str]) -> dict[str, str]:
        team = self.instance.team if self.instance else self.context["team"]
        problems = mcp.header_problems(value, team.pk)
        if "" in problems:
            raise serializers.ValidationError(problems[""])
        if problems:
            raise serializers.ValidationError({header: [problem] for header, problem in problems.items()})
        return value

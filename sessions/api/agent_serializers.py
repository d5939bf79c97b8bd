"""API shapes for what shapes an agent: agent profiles and skills (sessions/agent_models.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from sessions.agent_models import AgentProfile, Skill, clean_tool_names
from sessions.api.serializers import TeamField, TeamOwnedSerializer, clean_model


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

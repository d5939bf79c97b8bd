"""``/api/v1/slack-channels``: a channel's defaults (repository, environment, model) and whether it may
ask, team scoped like repositories (outsider 404, viewer 403). Workspaces are an admin's business."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers

from integrations.slack.models import SlackChannel, SlackWorkspace
from sessions.api.serializers import TeamOwnedSerializer, clean_model
from sessions.api.views import TeamOwnedViewSet
from sessions.models import Environment, Repository


class SlackChannelSerializer(TeamOwnedSerializer):
    workspace = serializers.SlugRelatedField(
        slug_field="slack_team_id",
        queryset=SlackWorkspace.objects.filter(enabled=True),
        help_text="The Slack team id of a workspace an admin connected (e.g. T0123ABCD).",
    )
    repository = serializers.PrimaryKeyRelatedField(
        queryset=Repository.objects.none(),
        required=False,
        allow_null=True,
        help_text="Default repository id.",
    )
    environment = serializers.PrimaryKeyRelatedField(
        queryset=Environment.objects.none(),
        required=False,
        allow_null=True,
        help_text="Default environment id.",
    )

    class Meta:
        model = SlackChannel
        fields = ["id", "team", "name", "workspace", "channel_id", "repository", "environment", "model",
                  "enabled", "created"]  # fmt: skip
        read_only_fields = ["created"]
        validators: list = []
        team_related = ["repository", "environment"]

    def validate_model(self, value: str) -> str:
        return clean_model(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        workspace = attrs.get("workspace", self.instance.workspace if self.instance else None)
        channel_id = attrs.get("channel_id", self.instance.channel_id if self.instance else None)
        clash = SlackChannel.objects.filter(workspace=workspace, channel_id=channel_id)
        if self.instance:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError(
                {"channel_id": ["This channel already has its row (one per channel)."]}
            )
        return attrs


@extend_schema_view(
    list=extend_schema(summary="List Slack channels"),
    create=extend_schema(summary="Allow a Slack channel, with its defaults"),
)
@extend_schema(tags=["slack"])
class SlackChannelViewSet(TeamOwnedViewSet):
    """Channels that may ask Deputies from Slack, and what their requests default to."""

    model = SlackChannel
    queryset = SlackChannel.objects.none()
    serializer_class = SlackChannelSerializer

    def get_queryset(self):
        return super().get_queryset().select_related("workspace")

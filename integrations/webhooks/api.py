"""``/api/v1/webhook-sources``: CRUD, team scoped like repositories (outsider 404, viewer 403).

The token (or HMAC secret) and the callback secret are in the answer to the create, and never again.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.utils.text import slugify
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from integrations.webhooks.models import WebhookSource
from sessions.api.serializers import TeamOwnedSerializer, clean_model
from sessions.api.views import TeamOwnedViewSet
from sessions.models import Environment, Repository


class WebhookSourceSerializer(TeamOwnedSerializer):
    url = serializers.CharField(read_only=True, help_text="Where the source sends its requests (POST).")
    repository = serializers.PrimaryKeyRelatedField(
        queryset=Repository.objects.none(),
        required=False,
        allow_null=True,
        help_text="Default repository id.",
    )
    environment = serializers.PrimaryKeyRelatedField(
        queryset=Environment.objects.none(), required=False, allow_null=True
    )
    allowed_repositories = serializers.PrimaryKeyRelatedField(
        queryset=Repository.objects.none(),
        many=True,
        required=False,
        help_text="Repository ids requests may name; empty: any of the team's (or a new URL).",
    )
    token = serializers.CharField(
        read_only=True, help_text="Token sources: shown once, in the create answer."
    )
    signing_secret = serializers.CharField(
        read_only=True, help_text="HMAC sources: shown once, in the create answer."
    )
    callback_secret = serializers.CharField(
        read_only=True, help_text="Signs callbacks to this source's callback_url; shown once, at creation."
    )

    class Meta:
        model = WebhookSource
        fields = [
            "id",
            "team",
            "name",
            "slug",
            "auth",
            "url",
            "repository",
            "environment",
            "model",
            "allowed_repositories",
            "enabled",
            "token_prefix",
            "created",
            "last_used",
            "token",
            "signing_secret",
            "callback_secret",
        ]
        read_only_fields = ["token_prefix", "created", "last_used"]
        # Shown once, in the create answer (to_representation): the schema must not require them.
        sometimes_absent = ["token", "signing_secret", "callback_secret"]
        validators: list = []
        extra_kwargs = {"slug": {"required": False}}
        team_related = ["repository", "environment", "allowed_repositories"]

    def to_representation(self, instance: WebhookSource) -> dict[str, Any]:
        data = super().to_representation(instance)
        shown = getattr(instance, "shown_credentials", {})
        for name in ("token", "signing_secret", "callback_secret"):
            if name in shown:
                data[name] = shown[name]
            else:
                data.pop(name, None)
        return data

    def validate_model(self, value: str) -> str:
        return clean_model(value)

    def validate_slug(self, value: str) -> str:
        clash = WebhookSource.objects.filter(slug=value)
        if self.instance:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError(f"The slug {value!r} is already in use; choose another.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if self.instance and "auth" in attrs and attrs["auth"] != self.instance.auth:
            raise serializers.ValidationError(
                {"auth": ["A source's authentication cannot change; create a new source."]}
            )
        attrs = super().validate(attrs)
        if not self.instance and not attrs.get("slug"):
            base = slugify(f"{attrs['team'].slug}-{attrs['name']}")[:80] or "source"
            slug = base
            while WebhookSource.objects.filter(slug=slug).exists():
                slug = f"{base}-{secrets.token_hex(3)}"
            attrs["slug"] = slug
        return attrs

    def create(self, validated_data: dict[str, Any]) -> WebhookSource:
        allowed = validated_data.pop("allowed_repositories", [])
        source = WebhookSource(**validated_data)
        shown = source.issue_credentials()
        source.save()
        source.allowed_repositories.set(allowed)
        source.shown_credentials = shown
        return source


@extend_schema_view(
    list=extend_schema(summary="List webhook sources"),
    create=extend_schema(summary="Add a webhook source (its secrets are in this answer only)"),
)
@extend_schema(tags=["webhooks"])
class WebhookSourceViewSet(TeamOwnedViewSet):
    """Senders allowed to start sessions with ``POST /integrations/webhooks/<slug>``."""

    model = WebhookSource
    queryset = WebhookSource.objects.none()
    serializer_class = WebhookSourceSerializer

    def get_queryset(self):
        return super().get_queryset().prefetch_related("allowed_repositories")

    @extend_schema(
        summary="Issue new credentials (shown in this answer only; the old ones stop working)",
        request=None,
        responses={200: WebhookSourceSerializer},
    )
    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, pk: str | None = None) -> Response:
        source = self.get_object()
        source.shown_credentials = source.rotate_credentials()
        return Response(self.get_serializer(source).data)

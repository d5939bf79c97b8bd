"""REST API for automations (scheduled sessions) and scheduled follow-ups (sessions/automations.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from sessions.api.errors import Conflict
from sessions.api.permissions import request_body
from sessions.api.serializers import TeamOwnedSerializer, clean_model
from sessions.api.views import TeamOwnedViewSet, TeamScopedMixin
from sessions.automations import Automation, AutomationFiring, ScheduledMessage, cron_problem, zone_problem
from sessions.models import AgentProfile, Environment, Repository, Session, SessionStatus, text_problem

MAX_DELAY = timedelta(days=366)


class AutomationSerializer(TeamOwnedSerializer):
    repository = serializers.PrimaryKeyRelatedField(
        queryset=Repository.objects.all(), help_text="Repository id."
    )
    environment = serializers.PrimaryKeyRelatedField(
        queryset=Environment.objects.all(), required=False, allow_null=True, help_text="Environment id."
    )
    profile = serializers.PrimaryKeyRelatedField(
        queryset=AgentProfile.objects.all(), required=False, allow_null=True, help_text="Agent profile id."
    )
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Automation
        fields = [
            "id",
            "team",
            "name",
            "cron",
            "timezone",
            "prompt",
            "repository",
            "environment",
            "profile",
            "model",
            "paused",
            "next_fire_at",
            "last_fired_at",
            "last_session",
            "created_by",
            "created",
            "updated",
        ]
        read_only_fields = ["paused", "next_fire_at", "last_fired_at", "last_session", "created", "updated"]
        validators: list = []  # the unique name per team is checked in validate(), with the team known

    def validate_cron(self, value: str) -> str:
        value = " ".join(value.split())
        if problem := cron_problem(value):
            raise serializers.ValidationError(problem)
        return value

    def validate_timezone(self, value: str) -> str:
        if problem := zone_problem(value.strip()):
            raise serializers.ValidationError(problem)
        return value.strip()

    def validate_prompt(self, value: str) -> str:
        if problem := text_problem(value, "prompt"):
            raise serializers.ValidationError(problem)
        return value.strip()

    def validate_model(self, value: str) -> str:
        return clean_model(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        team = self.instance.team if self.instance else attrs["team"]
        # Someone else's repository or environment reads as unknown, like any id of another team.
        for name in ("repository", "environment", "profile"):
            value = attrs.get(name)
            if value is not None and value.team_id != team.pk:
                raise serializers.ValidationError(
                    {name: [f"Unknown {name} {value.pk} in team {team.slug!r}."]}
                )
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Automation:
        validated_data["created_by"] = self.context["request"].user
        return super().create(validated_data)

    def update(self, instance: Automation, validated_data: dict[str, Any]) -> Automation:
        instance = super().update(instance, validated_data)
        if {"cron", "timezone"} & set(validated_data) and not instance.paused:
            instance.schedule()  # the next occurrence under the new rule
            instance.save(update_fields=["next_fire_at", "updated"])
        return instance


class AutomationFiringSerializer(serializers.ModelSerializer):
    class Meta:
        model = AutomationFiring
        fields = ["id", "due_at", "fired_at", "session", "skipped"]
        read_only_fields = fields


@extend_schema_view(
    list=extend_schema(summary="List automations"),
    create=extend_schema(summary="Create an automation (a session started on a cron schedule)"),
)
@extend_schema(tags=["automations"])
class AutomationViewSet(TeamOwnedViewSet):
    """Sessions started on a schedule: a cron expression read in a time zone, with a prompt, a
    repository, an environment and a model. Each occurrence is a normal session with source
    ``schedule``; one that finds the previous session still working is skipped, with the reason in
    ``firings``."""

    model = Automation
    queryset = Automation.objects.none()
    serializer_class = AutomationSerializer

    def get_queryset(self) -> QuerySet:
        return super().get_queryset().select_related("created_by")

    @extend_schema(summary="Pause it: nothing fires until it is resumed", request=None,
                   responses={200: AutomationSerializer, 409: OpenApiResponse(description="Already paused.")})  # fmt: skip
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        automation = self.get_object()
        if not automation.pause():
            raise Conflict("The automation is already paused.")
        automation.refresh_from_db()
        return Response(AutomationSerializer(automation, context=self.get_serializer_context()).data)

    @extend_schema(summary="Resume it from the next occurrence (missed ones are not run)", request=None,
                   responses={200: AutomationSerializer, 409: OpenApiResponse(description="Not paused.")})  # fmt: skip
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        automation = self.get_object()
        if not automation.resume():
            raise Conflict("The automation is not paused.")
        return Response(AutomationSerializer(automation, context=self.get_serializer_context()).data)

    @extend_schema(summary="Its occurrences, newest first: the session each started or why it was skipped",
                   responses={200: AutomationFiringSerializer(many=True)})  # fmt: skip
    @action(detail=True, methods=["get"])
    def firings(self, request: Request, pk: str | None = None) -> Response:
        automation = self.get_object()
        page = self.paginate_queryset(automation.firings.order_by("-due_at", "-pk"))
        return self.get_paginated_response(AutomationFiringSerializer(page, many=True).data)


class ScheduledMessageSerializer(serializers.ModelSerializer):
    delay_seconds = serializers.IntegerField(
        write_only=True, required=False, min_value=1, help_text="Send it this many seconds from now."
    )
    due_at = serializers.DateTimeField(required=False, help_text="Or: send it at this time.")

    class Meta:
        model = ScheduledMessage
        fields = [
            "id",
            "content",
            "steer",
            "due_at",
            "delay_seconds",
            "status",
            "message",
            "error",
            "created",
        ]
        read_only_fields = ["status", "message", "error", "created"]

    def validate_content(self, value: str) -> str:
        if problem := text_problem(value, "message"):
            raise serializers.ValidationError(problem)
        return value.strip()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        delay, due = attrs.pop("delay_seconds", None), attrs.get("due_at")
        if (delay is None) == (due is None):
            raise serializers.ValidationError({"due_at": ["Give either due_at or delay_seconds."]})
        now = timezone.now()
        if delay is not None:
            if timedelta(seconds=delay) > MAX_DELAY:
                raise serializers.ValidationError({"delay_seconds": ["At most a year."]})
            attrs["due_at"] = now + timedelta(seconds=delay)
        elif due <= now or due - now > MAX_DELAY:
            raise serializers.ValidationError({"due_at": ["Must be in the future, at most a year away."]})
        return attrs


@extend_schema(tags=["sessions"])
class ScheduledMessageViewSet(
    TeamScopedMixin,
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """One-time follow-ups of a session, sent at a set time ("re-check CI in 2 hours")."""

    serializer_class = ScheduledMessageSerializer
    queryset = ScheduledMessage.objects.none()
    team_lookup = "session__team"

    def session(self) -> Session:
        session = self.scope(Session.objects.all(), "team").filter(pk=self.kwargs["session_pk"]).first()
        if session is None:
            raise NotFound("No such session.")
        return session

    def get_queryset(self) -> QuerySet:
        return ScheduledMessage.objects.filter(session=self.session()).order_by("due_at", "pk")

    @extend_schema(summary="Schedule a follow-up", responses={201: ScheduledMessageSerializer})
    def create(self, request: Request, *args, **kwargs) -> Response:
        session = self.session()
        self.check_object_permissions(request, session)
        if session.status == SessionStatus.ARCHIVED:
            raise Conflict("The session is archived; it takes no more messages.")
        serializer = self.get_serializer(data=request_body(request.data))
        serializer.is_valid(raise_exception=True)
        serializer.save(session=session, created_by=request.user)
        return Response(serializer.data, status=status.HTTP_201_CREATED)

    @extend_schema(summary="Cancel a scheduled follow-up before it is sent",
                   responses={204: None, 409: OpenApiResponse(description="Already sent or cancelled.")})  # fmt: skip
    def destroy(self, request: Request, *args, **kwargs) -> Response:
        scheduled = self.get_object()
        if not scheduled.cancel():
            raise Conflict(f"The follow-up is already {scheduled.status}.")
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(summary="The session's scheduled follow-ups")
    def list(self, request: Request, *args, **kwargs) -> Response:
        return super().list(request, *args, **kwargs)

"""REST API for deliveries: a session's deliveries, one delivery with its log, and replay.

Team scoped like the rest of /api/v1: a delivery belongs to its session's team (someone else's is a
404), replay is a write (owners and members, staff; a viewer gets 403).
"""

from __future__ import annotations

from django.db.models import Prefetch, QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from integrations.deliveries import services
from integrations.deliveries.models import Delivery, DeliveryAttempt
from sessions.api.errors import Conflict
from sessions.api.views import TeamScopedMixin
from sessions.models import Session


class DeliveryAttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeliveryAttempt
        fields = ["number", "started", "duration_ms", "status_code", "response_excerpt", "error",
                  "retry_in_seconds"]  # fmt: skip


class DeliverySerializer(serializers.ModelSerializer):
    target = serializers.CharField(
        source="display_target", read_only=True, help_text="Without credentials or query string."
    )
    attempt_log = DeliveryAttemptSerializer(many=True, read_only=True)

    class Meta:
        model = Delivery
        fields = [
            "id", "session", "run", "kind", "event", "target", "status", "attempts", "max_attempts",
            "next_attempt", "created", "delivered", "last_status_code", "last_error", "idempotency_key",
            "replay_of", "payload", "attempt_log",
        ]  # fmt: skip
        read_only_fields = fields


def deliveries_queryset() -> QuerySet[Delivery]:
    return Delivery.objects.prefetch_related(
        Prefetch("attempt_log", queryset=DeliveryAttempt.objects.order_by("number", "pk"))
    ).order_by("-created", "-pk")


@extend_schema(tags=["deliveries"])
@extend_schema_view(list=extend_schema(summary="A session's deliveries (callbacks), newest first"))
class SessionDeliveriesViewSet(TeamScopedMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    """Outbound messages about one session, each with its attempt log."""

    serializer_class = DeliverySerializer
    queryset = Delivery.objects.none()

    def get_queryset(self) -> QuerySet[Delivery]:
        session = self.get_session()
        return deliveries_queryset().filter(session=session)

    def get_session(self) -> Session:
        from django.shortcuts import get_object_or_404

        return get_object_or_404(self.scope(Session.objects.all()), pk=self.kwargs["session_pk"])


@extend_schema(tags=["deliveries"])
@extend_schema_view(retrieve=extend_schema(summary="A delivery with its attempt log"))
class DeliveryViewSet(TeamScopedMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = DeliverySerializer
    queryset = Delivery.objects.none()
    team_lookup = "session__team"

    def get_queryset(self) -> QuerySet[Delivery]:
        return self.scope(deliveries_queryset().select_related("session"))

    @extend_schema(
        summary="Send a delivery again (a new delivery with the same idempotency key)",
        request=None,
        responses={
            201: DeliverySerializer,
            409: OpenApiResponse(description="It is still pending or sending."),
        },
    )
    @action(detail=True, methods=["post"])
    def replay(self, request: Request, pk: str | None = None) -> Response:
        delivery = self.get_object()
        try:
            copy = services.replay(delivery)
        except services.NotReplayable as exc:
            raise Conflict(f"{exc}; replay it once it has ended.") from None
        return Response(
            DeliverySerializer(deliveries_queryset().get(pk=copy.pk)).data, status=status.HTTP_201_CREATED
        )

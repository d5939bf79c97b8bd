"""Agent profiles, skills and MCP servers over the API: team-owned CRUD like repositories and
environments."""

from __future__ import annotations

from django.db.models import Q, QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view

from sessions.api.agent_serializers import AgentProfileSerializer, McpServerSerializer, SkillSerializer
from sessions.api.views import TeamOwnedViewSet
from sessions.models import AgentProfile, McpServer, Skill


@extend_schema_view(
    list=extend_schema(summary="List agent profiles"),
    create=extend_schema(summary="Add an agent profile"),
)
@extend_schema(tags=["agent profiles"])
class AgentProfileViewSet(TeamOwnedViewSet):
    """Named bundles of model, tools, skills, step limit and budget; a session picks one."""

    model = AgentProfile
    queryset = AgentProfile.objects.none()
    serializer_class = AgentProfileSerializer


@extend_schema_view(
    list=extend_schema(summary="List skills (the team's and your personal ones)"),
    create=extend_schema(summary="Add a skill"),
    update=extend_schema(summary="Replace a skill (a new revision)"),
    partial_update=extend_schema(summary="Edit a skill (a new revision)"),
)
@extend_schema(tags=["skills"])
class SkillViewSet(TeamOwnedViewSet):
    """Markdown instructions agents load on demand; personal skills are visible to their owner only."""

    model = Skill
    queryset = Skill.objects.none()
    serializer_class = SkillSerializer

    def get_queryset(self) -> QuerySet:
        queryset = super().get_queryset().select_related("owner")
        return queryset.filter(Q(owner__isnull=True) | Q(owner_id=self.request.user.pk))


@extend_schema_view(
    list=extend_schema(summary="List MCP servers"),
    create=extend_schema(summary="Add an MCP server"),
)
@extend_schema(tags=["MCP servers"])
class McpServerViewSet(TeamOwnedViewSet):
    """Remote MCP servers (streamable HTTP) whose tools the team's agents call through the worker.
    Servers every team gets (DEPUTIES_MCP_SERVERS) are not listed here."""

    model = McpServer
    queryset = McpServer.objects.none()
    serializer_class = McpServerSerializer

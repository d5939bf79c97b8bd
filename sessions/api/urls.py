from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from integrations.slack.api import SlackChannelViewSet
from integrations.webhooks.api import WebhookSourceViewSet
from sessions.api import agent_views, automations, health, views
from sessions.api.schema import Generator

# "/?": both /api/v1/sessions and /api/v1/sessions/ answer, without a redirect that drops a POST body.
router = SimpleRouter()
router.trailing_slash = "/?"  # the constructor only knows "/" or ""
router.register("sessions", views.SessionViewSet, basename="api-session")
router.register("artifacts", views.ArtifactViewSet, basename="api-artifact")
router.register("repositories", views.RepositoryViewSet, basename="api-repository")
router.register("environments", views.EnvironmentViewSet, basename="api-environment")
router.register("agent-profiles", agent_views.AgentProfileViewSet, basename="api-agent-profile")
router.register("skills", agent_views.SkillViewSet, basename="api-skill")
router.register("mcp-servers", agent_views.McpServerViewSet, basename="api-mcp-server")
router.register("webhook-sources", WebhookSourceViewSet, basename="api-webhook-source")
router.register("automations", automations.AutomationViewSet, basename="api-automation")
router.register(
    r"sessions/(?P<session_pk>[0-9]{1,18})/scheduled-messages",
    automations.ScheduledMessageViewSet,
    basename="api-scheduled-message",
)
router.register("slack-channels", SlackChannelViewSet, basename="api-slack-channel")


@csrf_exempt  # it changes nothing: an unknown path is a 404 whatever the cookies say
def api_not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Unknown paths under /api/ answer in JSON like every other API error."""
    return JsonResponse({"detail": f"No API endpoint at {request.path}.", "code": "not_found"}, status=404)


urlpatterns = [
    path("api/v1/", include(router.urls)),
    re_path(r"^api/schema/?$", SpectacularAPIView.as_view(generator_class=Generator), name="api-schema"),
    # Swagger UI with its assets from drf-spectacular-sidecar: nothing from a CDN. (Not Redoc: it
    # loads fonts and a logo from outside whatever its assets.)
    re_path(
        r"^api/docs/?$",
        SpectacularSwaggerView.as_view(url_name="api-schema", template_name="api/swagger_ui.html"),
        name="api-docs",
    ),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    re_path(r"^api/(?P<rest>.*)$", api_not_found),
]

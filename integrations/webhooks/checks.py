"""The /setup card for inbound webhooks."""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from sessions.web.setup_checks import Check

NAME = "Inbound webhooks"


def check() -> Check:
    from integrations.webhooks.models import WebhookSource

    if not settings.WEBHOOKS_ENABLED:
        return Check(NAME, "off", "Switched off.", "Set DEPUTIES_WEBHOOKS_ENABLED=true.")
    sources = list(WebhookSource.objects.filter(enabled=True).select_related("team", "environment"))
    fix = "Add a source in the admin (Webhooks › Webhook sources) or POST /api/v1/webhook-sources."
    if not sources:
        return Check(NAME, "off", "No enabled webhook source yet.", fix)
    now = timezone.now()
    details = [
        (
            f"{s.name} ({s.team.slug})",
            f"{s.auth}; {s.path}; last used "
            + (f"{int((now - s.last_used).total_seconds() // 60)} min ago" if s.last_used else "never"),
        )
        for s in sources
    ]
    no_model = [
        s.slug
        for s in sources
        if not (s.model or (s.environment and s.environment.default_model) or settings.DEFAULT_MODEL)
    ]
    if no_model:
        return Check(
            NAME,
            "warn",
            f"{len(no_model)} source(s) have no model, so their requests are refused: {', '.join(no_model)}.",
            "Give those sources a model, or set DEPUTIES_DEFAULT_MODEL.",
            details,
        )
    no_repo = [s.slug for s in sources if s.repository_id is None]
    summary = f"{len(sources)} source(s) accept requests at {settings.BASE_URL.rstrip('/')}/integrations/webhooks/<slug>."
    if no_repo:
        summary += f" Without a default repository (requests must name one): {', '.join(no_repo)}."
    return Check(NAME, "ok", summary, fix, details)

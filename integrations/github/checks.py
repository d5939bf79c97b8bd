"""The /setup card for the GitHub App."""

from __future__ import annotations

from django.conf import settings

from sessions.web.setup_checks import Check

NAME = "GitHub"


def check() -> Check:
    from integrations.github import client
    from integrations.github.models import Installation

    mode = client.mode()
    hook = f"{settings.BASE_URL.rstrip('/')}/integrations/github/webhook"
    fix = "Run `deputies github manifest`, register the app, then set DEPUTIES_GITHUB_APP_ID, DEPUTIES_GITHUB_PRIVATE_KEY and DEPUTIES_GITHUB_WEBHOOK_SECRET."
    if mode == "off":
        return Check(NAME, "off", "No GitHub App configured.", fix)
    installations = list(Installation.objects.select_related("team"))
    details = [("API", settings.GITHUB_API_URL), ("Webhook", hook), ("Trigger", settings.GITHUB_TRIGGER),
               ("Label", settings.GITHUB_LABEL)]  # fmt: skip
    details += [
        (f"Installation {i.installation_id}", f"{i.account or '?'} -> team {i.team.slug}")
        for i in installations
    ]
    if not settings.GITHUB_WEBHOOK_SECRET:
        return Check(NAME, "warn", "No DEPUTIES_GITHUB_WEBHOOK_SECRET: webhooks are refused.", fix, details)
    if not installations:
        return Check(NAME, "warn", "No installation is mapped to a team yet: webhooks are ignored.",
                     "Add one in the admin (GitHub › Installations).", details)  # fmt: skip
    if mode == "token":
        return Check(NAME, "warn", "Personal access token fallback (DEPUTIES_GITHUB_TOKEN): for quick trials "
                     "only; everything acts as that person.", fix, details)  # fmt: skip
    return Check(NAME, "ok", f"GitHub App {settings.GITHUB_APP_ID}; webhooks at {hook}.", fix, details)

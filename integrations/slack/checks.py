"""The /setup card for Slack: which tokens are present (never their values), which transport is on,
the connected workspaces and channels, and how recent Slack deliveries went; one fix line."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from sessions.web.setup_checks import Check

NAME = "Slack"


def check() -> Check:
    from integrations.deliveries.models import Delivery
    from integrations.slack.models import SlackChannel, SlackWorkspace

    bot, secret, app = settings.SLACK_BOT_TOKEN, settings.SLACK_SIGNING_SECRET, settings.SLACK_APP_TOKEN
    details = [
        ("Bot token (DEPUTIES_SLACK_BOT_TOKEN)", "present" if bot else "missing"),
        ("Signing secret (DEPUTIES_SLACK_SIGNING_SECRET)", "present" if secret else "missing"),
        ("App token (DEPUTIES_SLACK_APP_TOKEN)", "present" if app else "missing"),
    ]
    if not (bot or secret or app):
        return Check(
            NAME, "off", "Not configured.",
            "Run `deputies slack manifest`, create the app from it, then set DEPUTIES_SLACK_BOT_TOKEN and "
            "DEPUTIES_SLACK_APP_TOKEN (Socket Mode) or DEPUTIES_SLACK_SIGNING_SECRET (HTTP).",
            details,
        )  # fmt: skip
    if not bot:
        return Check(NAME, "error", "No bot token: Deputies cannot answer in Slack.",
                     "Set DEPUTIES_SLACK_BOT_TOKEN (xoxb-..., OAuth & Permissions).", details)  # fmt: skip
    if not (secret or app):
        return Check(NAME, "error", "No way in: neither a signing secret (HTTP) nor an app token (Socket Mode).",
                     "Set DEPUTIES_SLACK_APP_TOKEN (xapp-..., Socket Mode) or DEPUTIES_SLACK_SIGNING_SECRET.",
                     details)  # fmt: skip
    transports = []
    if secret:
        transports.append(f"HTTP at {settings.BASE_URL.rstrip('/')}/integrations/slack/")
    if app:
        transports.append("Socket Mode (" + ("in every worker" if settings.SLACK_SOCKET_MODE_IN_WORKER
                                            else "run `deputies slack`") + ")")  # fmt: skip
    workspaces = list(SlackWorkspace.objects.filter(enabled=True).select_related("team"))
    for w in workspaces:
        channels = SlackChannel.objects.filter(workspace=w, enabled=True).count()
        details.append((f"Workspace {w} ({w.slack_team_id})", f"team {w.team.slug}; "
                        + ("every channel" if w.all_channels else f"{channels} allowed channel(s)")))  # fmt: skip
    if not workspaces:
        return Check(NAME, "warn", "Tokens set, but no workspace is connected, so every request is refused.",
                     "Add the workspace (its team id) in the admin: Slack › Slack workspaces.", details)  # fmt: skip
    since = timezone.now() - timedelta(hours=1)
    failed = Delivery.objects.filter(kind="slack", status=Delivery.Status.FAILED, created__gte=since).count()
    waiting = Delivery.objects.filter(kind="slack", status=Delivery.Status.PENDING, attempts__gt=1).count()
    details.append(("Slack messages in the last hour", f"{failed} failed, {waiting} retrying now"))
    summary = f"{' and '.join(transports)}; {len(workspaces)} workspace(s)."
    if failed:
        last = (
            Delivery.objects.filter(kind="slack", status=Delivery.Status.FAILED).order_by("-created").first()
        )
        return Check(NAME, "warn", summary + f" {failed} message(s) failed in the last hour ({last.last_error[:120]}).",
                     "Check the bot token and that the app is in the channel; replay from the admin (Deliveries).",
                     details)  # fmt: skip
    return Check(NAME, "ok", summary, "", details)

"""Who may ask from Slack, in the order the answer explains it: the workspace (allowlist), the
channel (allowlist, or the workspace allows every channel), the person (the workspace's user
allowlist, then a Deputies user: an admin's mapping, else the verified email ``users.info`` gives),
then their role in the team the work goes to (a viewer may watch, not ask).

Every refusal is a ``Refused`` whose text is what the person sees (ephemeral), so it says what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from integrations.slack import client
from integrations.slack.models import SlackChannel, SlackUser, SlackWorkspace
from sessions.models import WRITE_ROLES, Membership, Team

log = logging.getLogger(__name__)


class Refused(Exception):
    """Nothing is queued; ``str(exc)`` is the answer the person sees."""


@dataclass
class Place:
    workspace: SlackWorkspace
    team: Team
    channel: SlackChannel | None  # its defaults, when the channel has a row


def place(slack_team_id: str, channel_id: str) -> Place:
    # One query for the usual case (a channel with its row, and its workspace).
    channel = (
        SlackChannel.objects.select_related("team", "repository", "environment", "workspace__team")
        .filter(workspace__slack_team_id=slack_team_id, channel_id=channel_id)
        .first()
    )
    workspace = channel.workspace if channel is not None else (
        SlackWorkspace.objects.select_related("team").filter(slack_team_id=slack_team_id).first()
    )  # fmt: skip
    if workspace is None or not workspace.enabled:
        raise Refused(
            "This Slack workspace is not connected to Deputies. An admin adds it under "
            f"Slack › Slack workspaces (team id {slack_team_id})."
        )
    if channel is not None and not channel.enabled:
        raise Refused("Deputies is switched off in this channel.")
    if channel is None and not workspace.all_channels:
        raise Refused(
            "Deputies does not take requests in this channel. An admin can allow it under "
            f"Slack › Slack channels (channel id {channel_id})."
        )
    return Place(workspace, channel.team if channel else workspace.team, channel)


def deputies_user(workspace: SlackWorkspace, slack_user_id: str):
    """The Deputies user this Slack user acts as."""
    if not workspace.allows_user(slack_user_id):
        raise Refused("You are not on the list of people who may ask Deputies in this workspace.")
    mapping = (
        SlackUser.objects.select_related("user")
        .filter(workspace=workspace, slack_user_id=slack_user_id)
        .first()
    )
    if mapping is not None and mapping.fresh:
        return _mapped(mapping)
    found = lookup(slack_user_id)
    if found is None:  # Slack did not answer: a mapping we had still counts
        if mapping is not None and mapping.user_id is not None:
            return mapping.user
        raise Refused("Deputies could not reach Slack to look up your account; try again in a minute.")
    email, user = found
    with transaction.atomic():
        try:
            with transaction.atomic():
                mapping, _ = SlackUser.objects.update_or_create(
                    workspace=workspace, slack_user_id=slack_user_id,
                    defaults={"via": SlackUser.Via.EMAIL, "email": email, "user": user,
                              "looked_up": timezone.now()},
                )  # fmt: skip
        except IntegrityError:  # looked up concurrently
            mapping = SlackUser.objects.select_related("user").get(
                workspace=workspace, slack_user_id=slack_user_id
            )
    return _mapped(mapping)


def _mapped(mapping: SlackUser):
    if mapping.user_id is None or not mapping.user.is_active:
        raise Refused(
            "Your Slack account is not linked to a Deputies user. Use the same verified email in both, "
            "or ask an admin to map you under Slack › Slack user mappings."
        )
    return mapping.user


def lookup(slack_user_id: str) -> tuple[str, object | None] | None:
    """``users.info``: (verified email, the active Deputies user with it or None); None when Slack
    did not answer. An unverified email maps to nobody."""
    result = client.call("users.info", user=slack_user_id, timeout=2.0)
    if not result.ok:
        log.warning("slack: users.info for %s failed: %s", slack_user_id, result.error)
        return None
    user = result.data.get("user") or {}
    email = str((user.get("profile") or {}).get("email") or "").strip()
    if not email or not user.get("is_email_confirmed", False) or user.get("is_bot") or user.get("deleted"):
        return (email if user.get("is_email_confirmed") else "", None)
    matches = list(get_user_model().objects.filter(email__iexact=email, is_active=True)[:2])
    return email, (matches[0] if len(matches) == 1 else None)


def require_writer(team: Team, user) -> None:
    if user.is_superuser:
        return
    role = Membership.objects.filter(team=team, user=user).values_list("role", flat=True).first()
    if role is None:
        raise Refused(f"You ({user.get_username()}) are not a member of the Deputies team {team.slug!r}.")
    if role not in WRITE_ROLES:
        raise Refused(
            f"You ({user.get_username()}) are a viewer in the Deputies team {team.slug!r}: viewers can "
            "follow sessions, not start or steer them. An owner can make you a member."
        )

"""Who may ask from Slack, what a channel defaults to, and the Slack side of a session's thread.

* ``SlackWorkspace``: the allowlist of workspaces (a Slack team id with no enabled row is refused),
  the Deputies team its sessions belong to, its user allowlist, and whether every channel may ask or
  only the channels that have a ``SlackChannel`` row.
* ``SlackChannel``: a channel's defaults (repository, environment, model), team owned like
  repositories, so the API and the admin edit it the same way.
* ``SlackUser``: a Slack user mapped to a Deputies user, by the verified email ``users.info`` returns
  (cached here) or explicitly by an admin (never overwritten by a lookup).
* ``SlackThread``: the Slack coordinates of a session (channel, thread, the message reactions go on,
  the status message). The thread -> session binding itself is ``sessions.SessionBinding``.
* ``SeenRequest``: the dedupe table: an event id, a slash command's or an action's trigger id is
  accepted once, whatever Slack retries or replays.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

EMAIL_LOOKUP_TTL = timedelta(days=1)


class SlackWorkspace(models.Model):
    slack_team_id = models.CharField(max_length=32, unique=True, help_text="Slack's team id, e.g. T0123ABCD.")
    name = models.CharField(max_length=200, blank=True)
    team = models.ForeignKey(
        "agent_sessions.Team", models.CASCADE, related_name="slack_workspaces",
        help_text="The Deputies team sessions from channels without their own row belong to.",
    )  # fmt: skip
    enabled = models.BooleanField(default=True)
    all_channels = models.BooleanField(
        default=False,
        help_text="Any channel may ask. Off: only channels listed under Slack channels (the allowlist).",
    )
    allowed_users = models.JSONField(
        default=list, blank=True, help_text="Slack user ids that may ask; empty: every mapped user."
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "slack_team_id"]

    def __str__(self) -> str:
        return self.name or self.slack_team_id

    def allows_user(self, slack_user_id: str) -> bool:
        return not self.allowed_users or slack_user_id in self.allowed_users


class SlackChannel(models.Model):
    team = models.ForeignKey("agent_sessions.Team", models.CASCADE, related_name="slack_channels")
    name = models.CharField(max_length=100, help_text="How people call it, e.g. #backend.")
    workspace = models.ForeignKey(SlackWorkspace, models.CASCADE, related_name="channels")
    channel_id = models.CharField(max_length=32, help_text="Slack's channel id, e.g. C0123ABCD.")
    repository = models.ForeignKey(
        "agent_sessions.Repository", models.SET_NULL, null=True, blank=True, related_name="+"
    )
    environment = models.ForeignKey(
        "agent_sessions.Environment", models.SET_NULL, null=True, blank=True, related_name="+"
    )
    model = models.CharField(
        max_length=200, blank=True, help_text="Empty: the environment's, else the default."
    )
    enabled = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "pk"]
        verbose_name = "Slack channel"
        constraints = [
            models.UniqueConstraint(fields=["workspace", "channel_id"], name="one_row_per_slack_channel"),
            models.UniqueConstraint(fields=["team", "name"], name="unique_slack_channel_name"),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        for name in ("repository", "environment"):
            related = getattr(self, name)
            if related is not None and self.team_id and related.team_id != self.team_id:
                raise ValidationError({name: f"Must belong to the channel's team ({self.team})."})


class SlackUser(models.Model):
    class Via(models.TextChoices):
        EMAIL = "email", "verified email (users.info)"
        ADMIN = "admin", "mapped by an admin"

    workspace = models.ForeignKey(SlackWorkspace, models.CASCADE, related_name="users")
    slack_user_id = models.CharField(max_length=32)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, models.CASCADE, null=True, blank=True, related_name="slack_users",
        help_text="Empty: looked up, and no Deputies user has that verified email.",
    )  # fmt: skip
    via = models.CharField(max_length=10, choices=Via.choices, default=Via.ADMIN)
    email = models.CharField(max_length=254, blank=True)
    looked_up = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "Slack user mapping"
        constraints = [
            models.UniqueConstraint(fields=["workspace", "slack_user_id"], name="one_mapping_per_slack_user")
        ]

    def __str__(self) -> str:
        return f"{self.slack_user_id} -> {self.user or 'nobody'}"

    @property
    def fresh(self) -> bool:
        if self.via == self.Via.ADMIN:
            return True
        return self.looked_up is not None and timezone.now() - self.looked_up < EMAIL_LOOKUP_TTL


class SlackThread(models.Model):
    class Trigger(models.TextChoices):
        COMMAND = "command"
        MENTION = "mention"

    session = models.OneToOneField("agent_sessions.Session", models.CASCADE, related_name="slack_thread")
    workspace = models.ForeignKey(SlackWorkspace, models.CASCADE, related_name="threads")
    channel_id = models.CharField(max_length=32)
    trigger = models.CharField(max_length=10, choices=Trigger.choices)
    requester = models.CharField(max_length=32, help_text="Slack user id of who asked.")
    # A mention: the user's message (and its thread). A slash command: empty until the bot's first
    # message in the channel is posted; that message is then both.
    root_ts = models.CharField(max_length=32, blank=True, help_text="The message reactions go on.")
    thread_ts = models.CharField(max_length=32, blank=True)
    status_ts = models.CharField(
        max_length=32, blank=True, help_text="The status message, edited as it goes."
    )
    status_queued = models.DateTimeField(
        null=True, blank=True, help_text="When the last throttled edit was queued (one per interval)."
    )
    created = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.channel_id}/{self.thread_ts or '(not posted yet)'} -> session {self.session_id}"

    @staticmethod
    def binding_key(slack_team_id: str, channel_id: str, thread_ts: str) -> str:
        return f"slack:{slack_team_id}:{channel_id}:{thread_ts}"


class SeenRequest(models.Model):
    """``event:<event_id>``, ``command:<trigger_id>``, ``action:<trigger_id>``: the first one wins."""

    key = models.CharField(max_length=200, unique=True)
    received = models.DateTimeField(default=timezone.now, db_index=True)
    session = models.ForeignKey(
        "agent_sessions.Session", models.SET_NULL, null=True, blank=True, related_name="+"
    )

    def __str__(self) -> str:
        return self.key

"""Which team an installation of the app works for, and which webhook deliveries were handled."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Installation(models.Model):
    """The admin's mapping of one installation of the app (an account's repositories) to a team:
    sessions from its webhooks belong to that team, and its repositories are created there on first
    use. With a personal access token instead of an app, the installation id is 0."""

    installation_id = models.BigIntegerField(
        unique=True, help_text="GitHub's id; 0 for a personal access token."
    )
    account = models.CharField(max_length=200, blank=True, help_text="The account it is installed on.")
    team = models.ForeignKey("agent_sessions.Team", models.CASCADE, related_name="github_installations")
    environment = models.ForeignKey(
        "agent_sessions.Environment", models.SET_NULL, null=True, blank=True, related_name="+"
    )
    model = models.CharField(
        max_length=200, blank=True, help_text="Empty: the environment's, else the default."
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["installation_id"]

    def __str__(self) -> str:
        return f"installation {self.installation_id} ({self.account or '?'}) -> {self.team}"


class SeenDelivery(models.Model):
    """A webhook delivery (``X-GitHub-Delivery``) that was acted on: GitHub redelivers, people press
    "Redeliver"; the unique key makes the second one a no-op."""

    guid = models.CharField(max_length=100, unique=True)
    event = models.CharField(max_length=50)
    session = models.ForeignKey(
        "agent_sessions.Session", models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.event} {self.guid}"

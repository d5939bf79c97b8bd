from __future__ import annotations

from django.db import models
from django.utils import timezone


class Sandbox(models.Model):
    class Status(models.TextChoices):
        CREATING = "creating"
        READY = "ready"
        DESTROYED = "destroyed"
        FAILED = "failed"

    session = models.ForeignKey("agent_sessions.Session", models.CASCADE, related_name="sandboxes")
    provider = models.CharField(max_length=20)
    external_id = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.CREATING)
    isolated = models.BooleanField(default=False)
    isolation_note = models.CharField(max_length=300, blank=True)
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(default=timezone.now)
    destroyed = models.DateTimeField(null=True, blank=True)
    # When the repository was uploaded and its setup script succeeded. A sandbox whose first run
    # died or failed before that is prepared again by the next run instead of being trusted.
    prepared = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created"]
        verbose_name_plural = "sandboxes"

    def __str__(self) -> str:
        return f"{self.provider}:{self.external_id or self.pk} ({self.status})"

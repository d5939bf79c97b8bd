"""Outbound deliveries: one row per message to the outside world, with its attempts as the log.

A ``Delivery`` owns its lifecycle (``pending -> sending -> delivered | failed``, back to ``pending``
between attempts) through conditional updates in ``integrations.deliveries.services``; the worker's
queue sends it, never a request. ``claimed_at`` is the lease of an attempt in flight: a worker that
dies mid-send leaves the row ``sending`` with an old ``claimed_at``, and recovery makes it pending again.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.db import models
from django.db.models import Q
from django.utils import timezone

from sessions.secrets import decrypt, encrypt


def display_url(url: str) -> str:
    """The URL without credentials or query string, for events, logs and pages: a callback URL may
    carry a token in either."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class CallbackSubscription(models.Model):
    """An HTTP endpoint told about the ends of a session's runs, signed with its own secret."""

    session = models.ForeignKey(
        "agent_sessions.Session", models.CASCADE, related_name="callback_subscriptions"
    )
    url = models.CharField(max_length=2000)
    secret_ciphertext = models.TextField(editable=False)
    label = models.CharField(
        max_length=200, blank=True, help_text="Where it came from, e.g. a webhook source."
    )
    active = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["session", "created"]
        constraints = [
            models.UniqueConstraint(fields=["session", "url"], name="one_subscription_per_session_url"),
        ]

    def __str__(self) -> str:
        return f"{display_url(self.url)} for session {self.session_id}"

    def set_secret(self, secret: str) -> None:
        self.secret_ciphertext = encrypt(secret)

    def secret(self) -> str:
        return decrypt(self.secret_ciphertext, f"the signing secret of callback {self.pk}")


class Delivery(models.Model):
    class Kind(models.TextChoices):
        HTTP = "http"
        SLACK = "slack"
        GITHUB = "github"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        DELIVERED = "delivered"
        FAILED = "failed"

    # Empty only for an answer that belongs to no session (Slack: telling someone why nothing was queued).
    session = models.ForeignKey(
        "agent_sessions.Session", models.CASCADE, null=True, blank=True, related_name="deliveries"
    )
    run = models.ForeignKey(
        "agent_sessions.Run", models.SET_NULL, null=True, blank=True, related_name="deliveries"
    )
    subscription = models.ForeignKey(
        CallbackSubscription, models.SET_NULL, null=True, blank=True, related_name="deliveries"
    )
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.HTTP)
    event = models.CharField(max_length=50, blank=True, help_text="What happened, e.g. run.completed.")
    target = models.CharField(
        max_length=2000, help_text="URL (http), channel/thread (slack), issue (github)."
    )
    payload = models.JSONField(default=dict)
    idempotency_key = models.CharField(max_length=200)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=8)
    next_attempt = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True, help_text="Lease of the attempt in flight.")
    created = models.DateTimeField(default=timezone.now)
    delivered = models.DateTimeField(null=True, blank=True)
    last_status_code = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    replay_of = models.ForeignKey("self", models.SET_NULL, null=True, blank=True, related_name="replays")

    class Meta:
        ordering = ["-created", "-pk"]
        verbose_name_plural = "deliveries"
        indexes = [models.Index(fields=["status", "next_attempt"], name="delivery_due")]
        constraints = [
            # An original per key: a caller that enqueues twice (a retried transaction) gets the
            # first one back. Replays share their original's key on purpose.
            models.UniqueConstraint(
                fields=["kind", "idempotency_key"],
                condition=Q(replay_of__isnull=True),
                name="one_original_delivery_per_key",
            ),
        ]

    def __str__(self) -> str:
        return f"Delivery {self.pk} ({self.kind} {self.status})"

    @property
    def display_target(self) -> str:
        return display_url(self.target) if self.kind == self.Kind.HTTP else self.target

    @property
    def done(self) -> bool:
        return self.status in (self.Status.DELIVERED, self.Status.FAILED)


class DeliveryAttempt(models.Model):
    """One try: what the receiver answered (or why nothing was sent), and the wait chosen after it."""

    delivery = models.ForeignKey(Delivery, models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    started = models.DateTimeField(default=timezone.now)
    duration_ms = models.PositiveIntegerField(default=0)
    status_code = models.IntegerField(null=True, blank=True)
    response_excerpt = models.TextField(blank=True)
    error = models.TextField(blank=True)
    retry_in_seconds = models.FloatField(
        null=True, blank=True, help_text="The back-off chosen after this attempt (empty: no retry)."
    )

    class Meta:
        ordering = ["delivery", "number", "pk"]

    def __str__(self) -> str:
        return f"attempt {self.number} of delivery {self.delivery_id}"

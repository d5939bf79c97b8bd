"""Webhook sources, and the rows that make inbound requests safe to retry and impossible to replay."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from sessions.models import Environment, Repository, Session, Team
from sessions.secrets import decrypt, encrypt

# A signed request is accepted when its timestamp is this close to our clock (either way); within
# it, a signature is accepted once.
SIGNATURE_WINDOW = timedelta(minutes=5)
TIMESTAMP_HEADER = "X-Deputies-Timestamp"
SIGNATURE_HEADER = "X-Deputies-Signature"


class Unauthorized(Exception):
    """The request does not prove it comes from the source; the message says what was wrong."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with the source's secret over ``b"<timestamp>." + body``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class WebhookSource(models.Model):
    class Auth(models.TextChoices):
        TOKEN = "token", "Bearer token"
        HMAC = "hmac", "HMAC-SHA256 signature"

    team = models.ForeignKey(Team, models.CASCADE, related_name="webhook_sources")
    name = models.CharField(max_length=100)
    slug = models.SlugField(
        max_length=100, unique=True, help_text="The last part of its URL: /integrations/webhooks/<slug>."
    )
    auth = models.CharField(max_length=10, choices=Auth.choices, default=Auth.TOKEN)
    # Token sources: only the SHA-256 of the token. HMAC sources: the secret, encrypted (verifying
    # needs it). Both sources: the secret that signs callbacks, encrypted. Plaintexts are shown once.
    token_prefix = models.CharField(max_length=12, blank=True, editable=False)
    token_hash = models.CharField(max_length=64, blank=True, editable=False)
    hmac_secret = models.TextField(blank=True, editable=False)
    callback_secret = models.TextField(blank=True, editable=False)
    repository = models.ForeignKey(
        Repository,
        models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="Used when a request names none.",
    )
    environment = models.ForeignKey(Environment, models.SET_NULL, null=True, blank=True, related_name="+")
    model = models.CharField(
        max_length=200, blank=True, help_text="provider/model; empty: the environment's, then the default."
    )
    allowed_repositories = models.ManyToManyField(
        Repository,
        blank=True,
        related_name="+",
        help_text="When set, requests may only name these (and the default repository).",
    )
    enabled = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="unique_webhook_source_name_per_team")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def path(self) -> str:
        return reverse("webhook-receive", args=[self.slug])

    @property
    def url(self) -> str:
        return settings.BASE_URL.rstrip("/") + self.path

    def issue_credentials(self) -> dict[str, str]:
        """New secrets for this (unsaved or re-keyed) source; the caller saves it and shows the
        returned plaintexts once: ``token`` or ``signing_secret``, and ``callback_secret``."""
        shown: dict[str, str] = {}
        self.token_prefix = self.token_hash = self.hmac_secret = ""
        if self.auth == self.Auth.TOKEN:
            token = "whk_" + secrets.token_urlsafe(32)
            self.token_prefix, self.token_hash = token[:10], _sha256(token)
            shown["token"] = token
        else:
            secret = "whsec_" + secrets.token_urlsafe(32)
            self.hmac_secret = encrypt(secret)
            shown["signing_secret"] = secret
        callback = "whcb_" + secrets.token_urlsafe(32)
        self.callback_secret = encrypt(callback)
        shown["callback_secret"] = callback
        return shown

    def rotate_credentials(self) -> dict[str, str]:
        """New token or signing secret and callback secret, saved; the old ones stop working now.
        (Callbacks already subscribed keep the secret they were subscribed with.)"""
        shown = self.issue_credentials()
        self.save(update_fields=["token_prefix", "token_hash", "hmac_secret", "callback_secret"])
        return shown

    def callback_signing_secret(self) -> str:
        return decrypt(self.callback_secret, f"the callback secret of webhook source {self.slug!r}")

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str | None:
        """Check the request's credentials over the raw body, before anything is parsed.

        Returns the signature of an HMAC request (the caller records it, so it is accepted once),
        ``None`` for a token request; raises ``Unauthorized``.
        """
        if self.auth == self.Auth.TOKEN:
            scheme, _, token = headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("Missing 'Authorization: Bearer <token>'.")
            if not self.token_hash or not hmac.compare_digest(_sha256(token.strip()), self.token_hash):
                raise Unauthorized("The token is not this source's.")
            return None
        raw_ts, given = headers.get(TIMESTAMP_HEADER, "").strip(), headers.get(SIGNATURE_HEADER, "").strip()
        if not raw_ts or not given:
            raise Unauthorized(f"Missing the {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header.")
        if not raw_ts.isdigit() or len(raw_ts) > 12:
            raise Unauthorized(f"{TIMESTAMP_HEADER} must be a Unix time in seconds.")
        now = time.time() if now is None else now
        if abs(now - int(raw_ts)) > SIGNATURE_WINDOW.total_seconds():
            raise Unauthorized(
                f"{TIMESTAMP_HEADER} is more than {int(SIGNATURE_WINDOW.total_seconds() // 60)} minutes "
                "from the server's clock."
            )
        expected = sign(
            decrypt(self.hmac_secret, f"the secret of webhook source {self.slug!r}"), raw_ts, body
        )
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized(f"{SIGNATURE_HEADER} does not match the body.")
        return expected.removeprefix("sha256=")


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class SeenSignature(models.Model):
    """A signature accepted within the window: the same one again is a replay. Rows whose timestamp
    left the window are deleted (a replay of them is refused as stale anyway)."""

    source = models.ForeignKey(WebhookSource, models.CASCADE, related_name="+")
    signature = models.CharField(max_length=64)
    timestamp = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["source", "signature"], name="unique_webhook_signature")
        ]

    @staticmethod
    def timestamp_of(headers: Mapping[str, str]) -> datetime:
        return datetime.fromtimestamp(int(headers[TIMESTAMP_HEADER].strip()), tz=UTC)


class DedupeKey(models.Model):
    """A ``dedupe_key`` a source sent, and the session it made: the same key again answers with
    that session. Claimed (with no session yet) before the work, so concurrent requests with one
    key wait on the unique constraint and find the winner's session."""

    source = models.ForeignKey(WebhookSource, models.CASCADE, related_name="dedupe_keys")
    key = models.CharField(max_length=200)
    session = models.ForeignKey(Session, models.CASCADE, null=True, related_name="+")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["source", "key"], name="unique_webhook_dedupe_key")]

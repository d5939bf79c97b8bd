"""One inbound webhook request, from raw bytes to a queued session: verify, validate, route.

Order matters: the credentials are checked on the raw body before it is parsed (401, nothing
written); then the body is validated (400 naming the field, nothing written); then one transaction
records the signature (a replay fails on its unique constraint), claims the ``dedupe_key`` (a
duplicate waits for the first request and answers with its session), and starts the session or adds
the follow-up of its thread through sessions/bindings.py, and subscribes its ``callback_url``
(integrations/deliveries: a signed callback, sent by a worker, when a run ends).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from rest_framework import serializers

from deputies.netguard import UnsafeAddress, check_url
from integrations.deliveries.services import subscribe
from integrations.webhooks.models import (
    SIGNATURE_WINDOW,
    DedupeKey,
    SeenSignature,
    Unauthorized,
    WebhookSource,
)
from sessions.api.serializers import CLONE_URL, clean_clone_url, repository_for_url
from sessions.bindings import BindingError, start_or_follow_up
from sessions.models import (
    Repository,
    Session,
    Source,
    model_problem,
    session_model,
    start_session,
    text_problem,
)
from sessions.secrets import SecretError

logger = logging.getLogger(__name__)

MAX_METADATA_BYTES = 16 * 1024
LAST_USED_EVERY = timedelta(minutes=1)


class WebhookError(Exception):
    """An answer other than success: ``status`` and the JSON body (``detail``, maybe ``errors``)."""

    def __init__(self, status: int, detail: str, errors: dict[str, list[str]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {"detail": detail}
        if errors:
            self.body["errors"] = errors


@dataclass
class Answer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class WebhookRequestSerializer(serializers.Serializer):
    prompt = serializers.CharField(allow_blank=True, trim_whitespace=False)
    repository = serializers.CharField(required=False, allow_blank=True, max_length=1000)
    dedupe_key = serializers.CharField(required=False, allow_blank=True, max_length=200)
    thread_id = serializers.CharField(required=False, allow_blank=True, max_length=200)
    callback_url = serializers.CharField(required=False, allow_blank=True, max_length=2000)
    metadata = serializers.JSONField(required=False)

    def validate_prompt(self, value: str) -> str:
        if problem := text_problem(value, "prompt"):
            raise serializers.ValidationError(problem)
        return value.strip()

    def validate_callback_url(self, value: str) -> str:
        value = value.strip()
        if value:
            try:
                check_url(value, allowed=settings.CALLBACK_ALLOWED_NETWORKS)
            except UnsafeAddress as exc:
                raise serializers.ValidationError(f"Refused: {exc}.") from None
        return value

    def validate_metadata(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("Expected a JSON object.")
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise serializers.ValidationError(f"Larger than {MAX_METADATA_BYTES} bytes as JSON.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        source: WebhookSource = self.context["source"]
        attrs["repository"], attrs["repository_url"] = find_repository(source, attrs.get("repository", ""))
        environment = source.environment
        model = session_model(source.model, environment=environment, team=source.team)
        if not model:
            raise serializers.ValidationError(
                {"model": [f"Webhook source {source.slug!r} has no model and no default is configured."]}
            )
        if problem := model_problem(model):
            raise serializers.ValidationError({"model": [f"The model of source {source.slug!r}: {problem}"]})
        attrs["model"] = model
        return attrs


def find_repository(source: WebhookSource, given: str) -> tuple[Repository | None, str]:
    """The repository a request names (a name in the source's team, or a clone URL), else the
    source's default, checked against its allowlist. Returns ``(repository, "")`` or, for a URL
    the team does not have yet and no allowlist restricts, ``(None, url)`` to create at commit."""
    given = given.strip()
    if not given:
        if source.repository is None:
            raise serializers.ValidationError(
                {"repository": [f"This field is required: webhook source {source.slug!r} has no default."]}
            )
        return source.repository, ""
    team_repos = source.team.repositories
    repository = team_repos.filter(name=given).first()
    url = ""
    if repository is None:
        if not CLONE_URL.match(given):
            raise serializers.ValidationError(
                {"repository": [f"No repository named {given!r} in team {source.team.slug!r}."]}
            )
        try:
            url = clean_clone_url(given)
        except serializers.ValidationError as exc:
            raise serializers.ValidationError({"repository": exc.detail}) from None
        repository = team_repos.filter(url=url).order_by("pk").first()
    allowed = list(source.allowed_repositories.all())
    if allowed and repository != source.repository and repository not in allowed:
        names = ", ".join(sorted(r.name for r in allowed))
        raise serializers.ValidationError(
            {"repository": [f"{given!r} is not in the allowlist of source {source.slug!r} ({names})."]}
        )
    return (repository, "") if repository is not None else (None, url)


def receive(slug: str, headers, body: bytes) -> Answer:
    """Handle one request to ``/integrations/webhooks/<slug>``; raises ``WebhookError``."""
    source = (
        WebhookSource.objects.select_related("team", "repository", "environment")
        .filter(slug=slug, enabled=True)
        .first()
    )
    if source is None or not settings.WEBHOOKS_ENABLED:
        raise WebhookError(404, f"No enabled webhook source {slug!r}.")
    try:
        signature = source.verify(headers, body)
    except Unauthorized as exc:
        raise WebhookError(401, str(exc)) from None
    except SecretError as exc:  # the keys of this process are not the ones it was written with
        logger.error("webhook source %s: %s", source.slug, exc)
        raise WebhookError(500, "The source's secret cannot be read on this server.") from None
    data = _parse(body)
    request = WebhookRequestSerializer(data=data, context={"source": source})
    if not request.is_valid():
        errors = {name: [str(m) for m in _flat(v)] for name, v in request.errors.items()}
        raise WebhookError(400, "Invalid input: " + ", ".join(errors) + ".", errors)
    try:
        return _route(source, request.validated_data, signature, headers)
    except SecretError as exc:  # the callback secret, as above
        logger.error("webhook source %s: %s", source.slug, exc)
        raise WebhookError(500, "The source's secret cannot be read on this server.") from None
    except BindingError:  # the source moved to another team after its thread started
        raise WebhookError(
            409,
            "Invalid input: thread_id.",
            {"thread_id": ["This thread belongs to another team's session."]},
        ) from None


def _route(source: WebhookSource, data: dict[str, Any], signature: str | None, headers) -> Answer:
    if signature is not None:
        # Its own short statement, before the request's transaction: deleting the same old rows
        # inside concurrent transactions would make them wait for each other.
        SeenSignature.objects.filter(source=source, timestamp__lt=timezone.now() - SIGNATURE_WINDOW).delete()
    with transaction.atomic():
        if signature is not None:
            _record_signature(source, signature, headers)
        claim = None
        if dedupe_key := data.get("dedupe_key", "").strip():
            claim, existing = _claim(source, dedupe_key)
            if existing is not None:
                return Answer(200, _shown(existing, created=False) | {"deduplicated": True})
        repository = data["repository"] or repository_for_url(source.team, data["repository_url"])
        ref = {"webhook_source": source.slug}
        if data.get("metadata"):
            ref["metadata"] = data["metadata"]
        start = {
            "repository": repository,
            "model": data["model"],
            "environment": source.environment,
        }
        message = None
        if thread_id := data.get("thread_id", "").strip():
            routed = start_or_follow_up(
                team=source.team,
                source=Source.WEBHOOK,
                key=f"webhook:{source.pk}:{thread_id}",
                thread=f"{source.name}: {thread_id}",
                prompt=data["prompt"],
                external_ref={**ref, "thread_id": thread_id},
                **start,
            )
            session, created, message = routed.session, routed.created, routed.message
        else:
            session = start_session(
                team=source.team, source=Source.WEBHOOK, external_ref=ref, prompt=data["prompt"], **start
            )
            created = True
        if callback_url := data.get("callback_url", ""):
            subscribe(session, callback_url, source.callback_signing_secret(), label=f"webhook {source.slug}")
        if claim is not None:
            DedupeKey.objects.filter(pk=claim.pk).update(session=session)
    _touch(source)
    body = _shown(session, created=created) | {"deduplicated": False}
    if message is not None:
        body["message"] = {"id": message.pk, "position": message.position}
    return Answer(202, body)


def _touch(source: WebhookSource) -> None:
    """Note when the source was last used, at most once a minute and after the commit: every
    request updating its source's row inside its transaction would make concurrent requests of
    one source wait for each other."""
    now = timezone.now()
    if source.last_used is None or now - source.last_used > LAST_USED_EVERY:
        WebhookSource.objects.filter(pk=source.pk).update(last_used=now)


def _record_signature(source: WebhookSource, signature: str, headers) -> None:
    """Accept a signature once: a second insert of it waits for the first request's transaction
    and then fails on the unique constraint."""
    try:
        with transaction.atomic():
            SeenSignature.objects.create(
                source=source, signature=signature, timestamp=SeenSignature.timestamp_of(headers)
            )
    except IntegrityError:
        raise WebhookError(401, "This signature was already used: a replayed request.") from None


def _claim(source: WebhookSource, key: str) -> tuple[DedupeKey | None, Session | None]:
    """Our claim on ``key``, or the session an earlier request with it made."""
    try:
        with transaction.atomic():
            return DedupeKey.objects.create(source=source, key=key), None
    except IntegrityError:
        pass
    # The other request committed (its insert made ours wait): its session is there.
    existing = DedupeKey.objects.select_related("session").get(source=source, key=key)
    return None, existing.session


def _shown(session: Session, *, created: bool) -> dict[str, Any]:
    return {
        "session": session.pk,
        "status": session.status,
        "created": created,
        "url": settings.BASE_URL.rstrip("/") + reverse("session-detail", args=[session.pk]),
        "api_url": settings.BASE_URL.rstrip("/") + reverse("api-session-detail", args=[session.pk]),
    }


def _parse(body: bytes) -> Any:
    try:
        data = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookError(400, "Invalid input: body.", {"body": [f"Not valid JSON: {exc}."]}) from None
    if not isinstance(data, dict):
        raise WebhookError(400, "Invalid input: body.", {"body": ["Expected a JSON object."]})
    return data


def _flat(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [f"{k}: {m}" for k, v in value.items() for m in _flat(v)]
    return list(value) if isinstance(value, list) else [value]

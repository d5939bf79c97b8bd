"""The HTTP transport: verify first (slack-sdk's ``SignatureVerifier``: v0 HMAC of the raw body,
5-minute window), before anything is parsed; bad, missing or stale: 401, nothing written. Then parse
and hand the payload to handler.py, the same code Socket Mode uses."""

from __future__ import annotations

import json
import logging
from functools import wraps
from urllib.parse import parse_qs

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import OperationalError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from integrations.slack import handler

log = logging.getLogger(__name__)


def _verified(request: HttpRequest) -> bytes | JsonResponse:
    if not settings.SLACK_SIGNING_SECRET:
        return JsonResponse(
            {"detail": "Slack over HTTP is not configured: set DEPUTIES_SLACK_SIGNING_SECRET."}, status=503
        )
    try:
        body = request.body
    except RequestDataTooBig:
        return JsonResponse({"detail": "The body is too large."}, status=413)
    timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
    signature = request.headers.get("X-Slack-Signature", "")
    if not timestamp or not signature:
        return JsonResponse({"detail": "Missing X-Slack-Request-Timestamp or X-Slack-Signature."}, status=401)
    from slack_sdk.signature import SignatureVerifier  # slack-sdk only where Slack is used

    try:
        valid = SignatureVerifier(settings.SLACK_SIGNING_SECRET).is_valid(body, timestamp, signature)
    except ValueError:  # a timestamp that is not a number
        valid = False
    if not valid:
        return JsonResponse({"detail": "Bad or stale Slack signature."}, status=401)
    return body


def _form(body: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _bad(field: str, why: str) -> JsonResponse:
    return JsonResponse({"detail": f"Invalid input: {field}.", "errors": {field: [why]}}, status=400)


DEADLOCK = "40P01"  # Postgres: deadlock_detected


def _answer(handle) -> JsonResponse:
    """The handler's answer. Postgres may pick a request's transaction as the victim of a deadlock
    with a worker updating the same session; the handler's transaction rolled back whole, so it is
    safe to run it again."""
    for attempt in range(3):
        try:
            answer = handle()
        except OperationalError as exc:
            if attempt == 2 or getattr(exc.__cause__, "sqlstate", None) != DEADLOCK:
                raise
        else:
            return JsonResponse(answer.body, status=answer.status)


def slack_request(view):
    """A POST from Slack: verified before anything is parsed; the view gets the raw body."""

    @csrf_exempt
    @require_POST
    @wraps(view)
    def verified_view(request: HttpRequest) -> JsonResponse:
        body = _verified(request)
        if isinstance(body, JsonResponse):
            return body
        return view(request, body)

    return verified_view


@slack_request
def events(request: HttpRequest, body: bytes) -> JsonResponse:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _bad("body", "Not valid JSON.")
    if not isinstance(data, dict):
        return _bad("body", "Expected a JSON object.")
    return _answer(lambda: handler.handle_event(data, retry_num=request.headers.get("X-Slack-Retry-Num")))


@slack_request
def commands(request: HttpRequest, body: bytes) -> JsonResponse:
    return _answer(lambda: handler.handle_command(_form(body)))


@slack_request
def interactive(request: HttpRequest, body: bytes) -> JsonResponse:
    try:
        payload = json.loads(_form(body).get("payload") or "")
    except ValueError:
        return _bad("payload", "Not valid JSON.")
    if not isinstance(payload, dict):
        return _bad("payload", "Expected a JSON object.")
    return _answer(lambda: handler.handle_interaction(payload))

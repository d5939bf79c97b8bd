"""The inbound endpoint: a plain view (no session, no CSRF: the source's credentials are the
authentication) that hands the raw body to ``services.receive``."""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from integrations.webhooks.services import WebhookError, receive


@csrf_exempt
@require_POST
def receive_view(request: HttpRequest, slug: str) -> JsonResponse:
    try:
        body = request.body
    except RequestDataTooBig:
        return JsonResponse({"detail": "The body is too large."}, status=413)
    try:
        answer = receive(slug, request.headers, body)
    except WebhookError as exc:
        return JsonResponse(exc.body, status=exc.status)
    return JsonResponse(answer.body, status=answer.status)

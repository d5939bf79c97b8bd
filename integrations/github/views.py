"""The webhook endpoint: a plain view (no login, no CSRF: the signature is the authentication)."""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from integrations.github.services import GithubWebhookError, receive


@csrf_exempt
@require_POST
def webhook_view(request: HttpRequest) -> JsonResponse:
    try:
        body = request.body
    except RequestDataTooBig:
        return JsonResponse({"detail": "The body is too large."}, status=413)
    try:
        answer = receive(request.headers, body)
    except GithubWebhookError as exc:
        return JsonResponse(exc.body, status=exc.status)
    return JsonResponse(answer.body, status=answer.status)

"""Every API error is JSON with a ``detail``; validation errors also name each bad field.

Shapes::

    {"detail": "Invalid input: prompt, model.", "errors": {"prompt": ["..."], "model": ["..."]}}
    {"detail": "Not found.", "code": "not_found"}
    {"detail": "The request body is larger than ...", "code": "request_too_large", "limit_bytes": 2621440}

A body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` makes Django raise ``RequestDataTooBig`` wherever the body
is first read: in DRF's parsing (``request.data``, handled by ``exception_handler``) or, for pages and
plain views, in middleware such as the CSRF check, where Django turns it into a 400 and calls
``handler400``: ``bad_request`` answers both with the same 413.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db.models import ProtectedError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

logger = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state of the object."
    default_code = "conflict"


class StorageUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The artifact store is unavailable."
    default_code = "storage_unavailable"


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"

    def __init__(self) -> None:
        super().__init__(too_large_detail())


def too_large_detail() -> str:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return (
        f"The request body is larger than the limit of {limit} bytes "
        "(DATA_UPLOAD_MAX_MEMORY_SIZE, set with DEPUTIES_MAX_REQUEST_BYTES)."
    )


def too_large_body() -> dict[str, Any]:
    return {
        "detail": too_large_detail(),
        "code": RequestTooLarge.default_code,
        "limit_bytes": settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
    }


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler400``: an oversized body read outside DRF (a page's form, a webhook) is a 413, in JSON
    unless a browser asked for a page; everything else is Django's usual 400."""
    if not isinstance(exception, RequestDataTooBig):
        return defaults.bad_request(request, exception)
    wants_page = not request.path.startswith("/api/") and "text/html" in request.headers.get("Accept", "")
    if wants_page:
        context = {"limit_bytes": settings.DATA_UPLOAD_MAX_MEMORY_SIZE, "detail": too_large_detail()}
        return render(request, "413.html", context, status=413)
    return JsonResponse(too_large_body(), status=413)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()  # the same answer for "missing" and "not yours"
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, ProtectedError):
        exc = Conflict(f"It is still in use by {len(exc.protected_objects)} other object(s).")
    response = drf_exception_handler(exc, context)
    if response is None:
        # An unexpected error: log it with the traceback, answer in JSON like every other error.
        view = context.get("view")
        logger.exception("unhandled error in %s", type(view).__name__ if view else "API view")
        set_rollback()
        return Response({"detail": "Internal server error.", "code": "error"}, status=500)
    if isinstance(exc, exceptions.ValidationError):
        response.data = _validation_body(exc.detail)
    elif isinstance(exc, RequestTooLarge):
        response.data = too_large_body()
    elif isinstance(exc, exceptions.APIException):
        response.data = {"detail": _text(exc.detail), "code": _code(exc)}
    return response


def _validation_body(detail: Any) -> dict[str, Any]:
    if isinstance(detail, dict):
        errors = {field: _messages(value) for field, value in detail.items()}
    else:
        errors = {"non_field_errors": _messages(detail)}
    fields = [f for f in errors if f != "non_field_errors"]
    if fields:
        summary = "Invalid input: " + ", ".join(fields) + "."
    else:
        summary = " ".join(str(m) for m in errors["non_field_errors"]) or "Invalid input."
    return {"detail": summary, "errors": errors}


def _messages(value: Any) -> Any:
    """Flat lists of strings, except for nested objects which keep their field names."""
    if isinstance(value, dict):
        return {k: _messages(v) for k, v in value.items()}
    if isinstance(value, list):
        if any(isinstance(v, dict) for v in value):
            return [_messages(v) for v in value]
        return [str(v) for v in value]
    return [str(value)]


def _text(detail: Any) -> str:
    if isinstance(detail, list):
        return " ".join(str(d) for d in detail)
    if isinstance(detail, dict):
        return " ".join(f"{k}: {_text(v)}" for k, v in detail.items())
    return str(detail)


def _code(exc: exceptions.APIException) -> str:
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else exc.default_code

"""``?limit=&offset=`` pages that reject what the schema does not allow.

DRF's LimitOffsetPagination quietly replaces a bad value (``limit=0/0`` is the default page,
``offset=-5`` is 0) and passes any limit to the database (a limit past a bigint was a 500). Here a bad
value is a 400 naming the parameter, and the schema states the bounds.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request

from sessions.api.permissions import MAX_ID

MAX_PAGE_SIZE = 1000


def _bounded(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:  # "?limit=" is not a number either
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: [f"Expected an integer, got {raw!r}."]}) from None
    if not minimum <= value <= maximum:
        raise ValidationError({name: [f"Must be between {minimum} and {maximum}, got {value}."]})
    return value


class Pagination(LimitOffsetPagination):
    max_limit = MAX_PAGE_SIZE

    def get_limit(self, request: Request) -> int:
        return _bounded(request, self.limit_query_param, self.default_limit, 1, self.max_limit)

    def get_offset(self, request: Request) -> int:
        # An offset past the end is an empty page; DRF never sends it to the database.
        return _bounded(request, self.offset_query_param, 0, 0, MAX_ID)

    def get_schema_operation_parameters(self, view) -> list[dict]:
        limit, offset = super().get_schema_operation_parameters(view)
        limit["schema"].update(minimum=1, maximum=self.max_limit)
        limit["description"] = f"Results per page (default {settings.REST_FRAMEWORK['PAGE_SIZE']})."
        offset["schema"].update(minimum=0, maximum=MAX_ID)
        return [limit, offset]

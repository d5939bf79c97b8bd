"""OpenAPI generation: the bearer scheme, paths without the optional trailing slash, and a schema that
tells the truth about errors, ids and bounds (``tests/test_api_conformance.py`` holds it to that).

Every operation documents the error answers it can give, each with the JSON body of
``sessions/api/errors.py``: 400 (a request body or query parameters to validate), 401 (no or a bad
credential), 403 (writes: viewers, and the CSRF check of cookie sessions), 404 (an id in the path),
409 where a view declares it, 413 (a request body over ``DATA_UPLOAD_MAX_MEMORY_SIZE``) and 429 when
the view is throttled.
"""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.generators import EndpointEnumerator, SchemaGenerator
from rest_framework import serializers

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# A path id as the routers match it (TeamScopedMixin.lookup_value_regex): up to N digits.
DIGITS_PATTERN = re.compile(r"\^\[0-9\]\{1,(\d+)\}\$")


def bounded_int(minimum: int, maximum: int | None = None) -> dict[str, Any]:
    """The schema of an integer query parameter checked with these bounds (``views.query_int``)."""
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


class ErrorSerializer(serializers.Serializer):
    """Every API error. Validation errors (400) carry ``errors``, the messages for each bad field."""

    detail = serializers.CharField(help_text="What went wrong, in one sentence.")
    code = serializers.CharField(required=False, help_text="A stable code, e.g. not_found, conflict.")
    errors = serializers.DictField(
        required=False, help_text="Validation errors: field name -> list of messages (or nested fields)."
    )


class RequestTooLargeSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField(help_text="request_too_large")
    limit_bytes = serializers.IntegerField(help_text="The largest body this server reads.")


ERRORS: dict[str, tuple[str, type[serializers.Serializer]]] = {
    "400": ("Invalid input: the body or a query parameter (named in errors).", ErrorSerializer),
    "401": ("No credentials, or an invalid bearer token.", ErrorSerializer),
    "403": ("Not allowed: read-only (viewer) access, or a failed CSRF check.", ErrorSerializer),
    "404": ("No such object in your teams.", ErrorSerializer),
    "413": ("The request body is larger than the server accepts.", RequestTooLargeSerializer),
    "429": ("Too many requests: wait for Retry-After seconds.", ErrorSerializer),
}


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "sessions.api.auth.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token from `deputies token create USER`.",
        }


class AutoSchema(openapi.AutoSchema):
    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        responses = operation["responses"]
        for code in self.error_codes(operation):
            description, serializer = ERRORS[code]
            responses.setdefault(code, {"description": description})
        for code, response in responses.items():
            if code >= "400" and "content" not in response:
                serializer = ERRORS.get(code, ("", ErrorSerializer))[1]
                ref = self.resolve_serializer(serializer, "response").ref
                response["content"] = {"application/json": {"schema": ref}}
        if "401" in responses:
            responses["401"].setdefault("headers", {})["WWW-Authenticate"] = {
                "schema": {"type": "string"},
                "description": "The scheme to authenticate with: Bearer.",
            }
        if "429" in responses:
            responses["429"].setdefault("headers", {})["Retry-After"] = {
                "schema": {"type": "integer"},
                "description": "Seconds to wait before trying again.",
            }
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def error_codes(self, operation: dict[str, Any]) -> list[str]:
        parameters = operation.get("parameters", [])
        in_path = any(p["in"] == "path" for p in parameters)
        # ?format= picks a renderer; an unknown one is a 404, not a validation error.
        in_query = any(p["in"] == "query" and p["name"] != "format" for p in parameters)
        body = "requestBody" in operation
        codes = []
        if body or in_query:
            codes.append("400")
        if operation.get("security") and {} not in operation["security"]:
            codes.append("401")
        if self.method in UNSAFE_METHODS:
            codes.append("403")
        if in_path:
            codes.append("404")
        if body:
            codes.append("413")
        if self.view.get_throttles():
            codes.append("429")
        return codes

    def _map_basic_serializer(self, serializer, direction):
        schema = super()._map_basic_serializer(serializer, direction)
        # Fields a serializer leaves out of some answers (``Meta.sometimes_absent``, e.g. a secret
        # shown once) are read-only but not required.
        absent = set(getattr(getattr(serializer, "Meta", None), "sometimes_absent", ()))
        if absent and "required" in schema:
            schema["required"] = [name for name in schema["required"] if name not in absent]
            if not schema["required"]:
                del schema["required"]
        return schema

    def _resolve_path_parameters(self, variables):
        parameters = super()._resolve_path_parameters(variables)
        for parameter in parameters:
            match = DIGITS_PATTERN.fullmatch(parameter["schema"].get("pattern", ""))
            if parameter["schema"].get("type") == "string" and match:
                # Ids are bigints; the route takes only digits, so the schema says integer.
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": 10 ** int(match[1]) - 1}
        return parameters


class Endpoints(EndpointEnumerator):
    def get_path_from_regex(self, path_regex: str) -> str:
        # The router accepts "/?"; the canonical form is without the slash.
        return super().get_path_from_regex(path_regex.replace("/?$", "$"))


class Generator(SchemaGenerator):
    endpoint_inspector_cls = Endpoints

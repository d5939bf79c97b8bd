"""OpenAPI generation: the bearer scheme, and paths shown without the optional trailing slash."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.generators import EndpointEnumerator, SchemaGenerator


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "sessions.api.auth.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token from `deputies token create USER`.",
        }


class Endpoints(EndpointEnumerator):
    def get_path_from_regex(self, path_regex: str) -> str:
        # The router accepts "/?"; the canonical form is without the slash.
        return super().get_path_from_regex(path_regex.replace("/?$", "$"))


class Generator(SchemaGenerator):
    endpoint_inspector_cls = Endpoints

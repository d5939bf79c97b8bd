"""``/api/docs/``: the OpenAPI schema rendered as one plain HTML page on the server.

Swagger UI and Redoc load their JavaScript from a CDN unless ``drf-spectacular-sidecar`` is
installed; deployments may have no internet, so this page needs nothing but the schema.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import escape, format_html
from django.views.decorators.http import require_safe

from sessions.api.schema import Generator

METHODS = ("get", "post", "put", "patch", "delete")

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2.5rem;border-bottom:1px solid #ddd}
.op{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;margin:1rem 0}
.m{display:inline-block;min-width:4.5rem;font-weight:bold;font-family:monospace}
code,.path{font-family:ui-monospace,monospace}.path{font-weight:bold}
table{border-collapse:collapse;margin:.3rem 0 .6rem}td,th{padding:.15rem .6rem;text-align:left;
vertical-align:top;border-bottom:1px solid #eee}th{font-weight:600}.muted{color:#777}
"""


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    for _ in range(5):
        if "$ref" in schema:
            schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
        elif "allOf" in schema and len(schema["allOf"]) == 1:
            schema = schema["allOf"][0]
        else:
            break
    return schema


def _type(schema: dict[str, Any], components: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = components.get(name, {})
        return _type(target, components) if "enum" in target else name
    if "oneOf" in schema:
        return " | ".join(_type(s, components) for s in schema["oneOf"])
    if "allOf" in schema:
        return " & ".join(_type(s, components) for s in schema["allOf"])
    kind = schema.get("type", "object")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}), components)}"
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"] if v is not None)
    return str(kind) + (" | null" if schema.get("nullable") else "")


def _fields(schema: dict[str, Any], components: dict[str, Any], direction: str) -> str:
    schema = _resolve(schema, components)
    if schema.get("type") == "array":
        return _fields(schema.get("items", {}), components, direction)
    props = schema.get("properties")
    if not props:
        return format_html("<p class=muted>{}</p>", _type(schema, components))
    required = set(schema.get("required", []))
    rows = []
    for name, prop in props.items():
        if direction == "request" and prop.get("readOnly"):
            continue
        if direction == "response" and prop.get("writeOnly"):
            continue
        note = "required" if direction == "request" and name in required else ""
        rows.append(
            format_html(
                "<tr><td><code>{}</code></td><td>{}</td><td class=muted>{}</td><td>{}</td></tr>",
                name,
                _type(prop, components),
                note,
                prop.get("description", ""),
            )
        )
    return "<table>" + "".join(rows) + "</table>"


def _operation(path: str, method: str, op: dict[str, Any], components: dict[str, Any]) -> str:
    out = [
        format_html(
            "<div class=op><span class=m>{}</span><span class=path>{}</span> <span>{}</span>",
            method.upper(),
            path,
            op.get("summary", ""),
        )
    ]
    if op.get("description"):
        out.append(format_html("<p>{}</p>", op["description"]))
    params = op.get("parameters", [])
    if params:
        rows = "".join(
            format_html(
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                p["name"],
                p.get("in", ""),
                _type(p.get("schema", {}), components),
                p.get("description", ""),
            )
            for p in params
        )
        out.append(f"<strong>Parameters</strong><table>{rows}</table>")
    body = op.get("requestBody", {}).get("content", {})
    if "application/json" in body:
        out.append("<strong>Request body</strong>")
        out.append(_fields(body["application/json"].get("schema", {}), components, "request"))
    for code, response in op.get("responses", {}).items():
        out.append(format_html("<div><strong>{}</strong> {}</div>", code, response.get("description", "")))
        content = response.get("content", {})
        if "application/json" in content:
            out.append(_fields(content["application/json"].get("schema", {}), components, "response"))
    out.append("</div>")
    return "".join(out)


@require_safe
def api_docs(request: HttpRequest) -> HttpResponse:
    schema = Generator().get_schema(request=None, public=True)
    components = schema.get("components", {}).get("schemas", {})
    info = schema.get("info", {})
    schema_url = reverse("api-schema")
    sections: dict[str, list[str]] = {}
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                tag = (item[method].get("tags") or ["api"])[0]
                sections.setdefault(tag, []).append(_operation(path, method, item[method], components))
    body = "".join(format_html("<h2>{}</h2>", tag) + "".join(ops) for tag, ops in sections.items())
    page = (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{escape(info.get('title', 'API'))}</title><style>{STYLE}</style></head><body>"
        + format_html(
            "<h1>{} <span class=muted>v{}</span></h1><p>{}</p>",
            info.get("title", "API"),
            info.get("version", ""),
            info.get("description", ""),
        )
        + format_html(
            "<p>Authenticate with <code>Authorization: Bearer &lt;token&gt;</code> "
            "(create one with <code>deputies token create USER</code>) or a logged-in browser session. "
            'Errors are JSON: <code>{{"detail": ..., "errors": {{field: [messages]}}}}</code>. '
            'Machine-readable schema: <a href="{}">OpenAPI (YAML)</a>, <a href="{}?format=json">JSON</a>.</p>',
            schema_url,
            schema_url,
        )
        + body
        + "</body></html>"
    )
    return HttpResponse(page)

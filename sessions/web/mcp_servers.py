"""The MCP servers page: a team's remote MCP servers, listed, added, edited and deleted.

Writes go through the API serializer (sessions/api/agent_serializers.py), so the page and the API
accept and refuse the same things; header values name secrets and are shown as written.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from sessions.api.agent_serializers import McpServerSerializer
from sessions.api.permissions import can_write, readable_teams, writable_teams
from sessions.models import McpServer

READ_ONLY = "You have read-only (viewer) access; {} an MCP server needs owner or member."


class McpServerForm(forms.Form):
    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    name = forms.CharField(max_length=40, help_text="Its tools reach the model as NAME__tool.")
    url = forms.CharField(
        max_length=1000,
        label="URL",
        help_text="The streamable HTTP endpoint, e.g. https://mcp.example.com/mcp.",
    )
    headers = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text='A JSON object, e.g. {"Authorization": "Bearer ${MCP_TOKEN}"}: ${NAME} is a secret of '
        "the session's environment, filled in by the worker for each call. Never paste a credential here.",
    )
    timeout_seconds = forms.FloatField(
        required=False, label="Timeout (seconds)", help_text="Per call. Empty: DEPUTIES_MCP_TIMEOUT."
    )
    enabled = forms.BooleanField(
        required=False, initial=True, help_text="Off: new runs are not offered its tools."
    )

    def __init__(self, *args, user, server: McpServer | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user, self.server = user, server
        self.fields["team"].queryset = writable_teams(user)
        if server is not None:
            self.fields["team"].disabled = True
            self.initial.update(
                team=server.team_id,
                name=server.name,
                url=server.url,
                headers=json.dumps(server.headers, indent=2) if server.headers else "",
                timeout_seconds=server.timeout_seconds,
                enabled=server.enabled,
            )

    def clean_headers(self) -> Any:
        text = self.cleaned_data["headers"].strip()
        try:
            return json.loads(text) if text else {}
        except ValueError as exc:
            raise forms.ValidationError(f"Not JSON: {exc}.") from None

    def save(self) -> McpServer | None:
        """Through the API's serializer; its errors land on the form's fields."""
        if not self.is_valid():
            return None
        data = {k: self.cleaned_data[k] for k in ("name", "url", "headers", "timeout_seconds", "enabled")}
        context = {"request": SimpleNamespace(user=self.user)}
        if self.server is None:
            serializer = McpServerSerializer(
                data=data, context={**context, "team": self.cleaned_data["team"]}
            )
        else:
            serializer = McpServerSerializer(self.server, data=data, partial=True, context=context)
        if not serializer.is_valid():
            for field, errors in serializer.errors.items():
                self.add_error(field if field in self.fields else None, _messages(errors))
            return None
        return serializer.save()


def _messages(errors: Any) -> list[str]:
    """The serializer's messages, flat: a header's own messages are prefixed with its name."""
    if isinstance(errors, dict):
        return [f"{key}: {m}" for key, value in errors.items() for m in _messages(value)]
    return [str(e) for e in errors]


def visible_servers(user) -> QuerySet[McpServer]:
    queryset = McpServer.objects.select_related("team")
    return queryset if user.is_staff else queryset.filter(team__in=readable_teams(user))


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def mcp_server_list(request: HttpRequest) -> HttpResponse:
    form = None
    if writable_teams(request.user).exists():
        form = McpServerForm(request.POST or None, user=request.user)
        if request.method == "POST":
            server = form.save()
            if server is not None:
                messages.success(request, f"MCP server {server.name} added.")
                return redirect("mcp-server-list")
    elif request.method == "POST":
        raise PermissionDenied(READ_ONLY.format("adding"))
    context = {
        "servers": visible_servers(request.user).order_by("team__name", "name", "pk"),
        "deployment_servers": [{"name": s["name"], "url": s["url"]} for s in settings.MCP_SERVERS],
        "form": form,
    }
    status = 400 if form is not None and form.errors else 200
    return render(request, "sessions/mcp_servers.html", context, status=status)


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def mcp_server_detail(request: HttpRequest, pk: int) -> HttpResponse:
    server = get_object_or_404(visible_servers(request.user), pk=pk)
    writable = can_write(request.user, server.team_id)
    form = McpServerForm(request.POST or None, user=request.user, server=server) if writable else None
    if request.method == "POST":
        if form is None:
            raise PermissionDenied(READ_ONLY.format("editing"))
        saved = form.save()
        if saved is not None:
            messages.success(request, f"MCP server {saved.name} saved.")
            return redirect("mcp-server-detail", pk=saved.pk)
    status = 400 if form is not None and form.errors else 200
    return render(request, "sessions/mcp_server_form.html", {"server": server, "form": form}, status=status)


@require_POST
@login_required
def mcp_server_delete(request: HttpRequest, pk: int) -> HttpResponse:
    server = get_object_or_404(visible_servers(request.user), pk=pk)
    if not can_write(request.user, server.team_id):
        raise PermissionDenied(READ_ONLY.format("deleting"))
    server.delete()
    messages.success(request, f"MCP server {server.name} deleted.")
    return redirect("mcp-server-list")

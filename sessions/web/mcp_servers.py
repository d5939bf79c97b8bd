"""The MCP servers page: a team's remote MCP servers, listed, added, edited and deleted.

Writes go through the API serializer (sessions/api/agent_serializers.py), so the page and the API
accept and refuse the same things; header values name secrets and are shown as written.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpRequest

from sessions.api.agent_serializers import McpServerSerializer
from sessions.api.permissions import readable_teams, writable_teams
from sessions.models import McpServer
from sessions.web.team_pages import TeamPages, save_through


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

    def __init__(self, *args, user, instance: McpServer | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user, self.server = user, instance
        self.fields["team"].queryset = writable_teams(user)
        if (server := instance) is not None:
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
        if not self.is_valid():
            return None
        data = {k: self.cleaned_data[k] for k in ("name", "url", "headers", "timeout_seconds", "enabled")}
        return save_through(self, McpServerSerializer, self.server, data, team=self.cleaned_data["team"])


class McpServerPages(TeamPages):
    noun, article = "MCP server", "an"
    form_class = McpServerForm
    list_template, detail_template = "sessions/mcp_servers.html", "sessions/mcp_server_form.html"
    list_url, detail_url = "mcp-server-list", "mcp-server-detail"
    list_name, object_name = "servers", "server"

    def visible(self, user) -> QuerySet[McpServer]:
        queryset = McpServer.objects.select_related("team").order_by("team__name", "name", "pk")
        return queryset if user.is_staff else queryset.filter(team__in=readable_teams(user))

    def list_context(self, request: HttpRequest) -> dict[str, Any]:
        # Every team's, from the operator's settings: names and addresses only, never headers.
        return {"deployment_servers": [{"name": s["name"], "url": s["url"]} for s in settings.MCP_SERVERS]}


pages = McpServerPages()

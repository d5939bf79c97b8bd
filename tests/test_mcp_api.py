"""MCP servers over the API and on the dashboard: team-scoped CRUD through one serializer, the same
address rules as at call time, headers that name secrets and never carry their values."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from deputies.netguard import parse_networks
from sessions.models import Environment, McpServer
from tests.conftest import client_for

SERVERS = "/api/v1/mcp-servers"
TOKEN = "mcp-token-value-0123456789"
URL = "http://127.0.0.1:9/mcp"  # never connected to: the checks only resolve the address


@pytest.fixture
def loopback_allowed(settings):
    settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")


@pytest.fixture
def secret(team):
    environment = Environment.objects.create(team=team, name="tools")
    environment.change_secrets({"MCP_TOKEN": {"value": TOKEN}}, new_revision=False)
    return environment


def body(**overrides) -> dict:
    return {"name": "docs", "url": URL, "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}, **overrides}


def test_it_creates_lists_updates_and_deletes_a_server(loopback_allowed, secret, owner, team):
    client = client_for(owner)
    created = client.post(SERVERS, body(timeout_seconds=12.5), format="json")
    assert created.status_code == 201, created.json()
    server = created.json()
    assert (server["name"], server["url"], server["enabled"], server["timeout_seconds"]) == (
        "docs",
        URL,
        True,
        12.5,
    )
    assert server["headers"] == {"Authorization": "Bearer ${MCP_TOKEN}"}
    assert server["team"]["slug"] == team.slug
    assert [s["name"] for s in client.get(SERVERS).json()["results"]] == ["docs"]

    edited = client.patch(
        f"{SERVERS}/{server['id']}", {"enabled": False, "timeout_seconds": None}, format="json"
    )
    assert edited.status_code == 200, edited.json()
    row = McpServer.objects.get()
    assert (row.enabled, row.timeout_seconds, row.headers) == (False, None, server["headers"])
    replaced = client.put(
        f"{SERVERS}/{server['id']}", {"name": "wiki", "url": "http://127.0.0.1:10/mcp"}, format="json"
    )
    assert replaced.status_code == 200, replaced.json()
    assert (replaced.json()["name"], replaced.json()["headers"]) == (
        "wiki",
        {"Authorization": "Bearer ${MCP_TOKEN}"},
    )

    assert client.delete(f"{SERVERS}/{server['id']}").status_code == 204
    assert not McpServer.objects.exists()


def test_it_never_answers_with_a_secrets_value(loopback_allowed, secret, owner):
    client = client_for(owner)
    created = client.post(
        SERVERS, body(headers={"X-Api-Key": "${MCP_TOKEN}", "X-Tenant": "acme"}), format="json"
    )
    assert created.status_code == 201, created.json()
    answers = [created, client.get(SERVERS), client.get(f"{SERVERS}/{created.json()['id']}")]
    assert all(TOKEN not in a.content.decode() for a in answers)
    assert created.json()["headers"] == {"X-Api-Key": "${MCP_TOKEN}", "X-Tenant": "acme"}


@pytest.mark.parametrize(
    ("headers", "header"),
    [
        ({"Authorization": "Bearer ${NOPE}"}, "Authorization"),  # no such secret in the team
        ({"Authorization": f"Bearer {TOKEN}"}, "Authorization"),  # a credential stored in the row
        ({"Cookie": "session=abc"}, "Cookie"),
        ({"Bad Header": "x"}, "Bad Header"),
        ({"X-Note": "two\nlines"}, "X-Note"),
        ({"Host": "elsewhere.example"}, "Host"),
    ],
)
def test_it_refuses_headers_naming_the_header(loopback_allowed, secret, owner, headers, header):
    response = client_for(owner).post(SERVERS, body(headers=headers), format="json")
    assert response.status_code == 400, response.json()
    assert list(response.json()["errors"]) == ["headers"]
    assert header in response.json()["errors"]["headers"]
    assert TOKEN not in response.content.decode()
    assert not McpServer.objects.exists()


def test_it_refuses_a_secret_only_another_team_has(loopback_allowed, secret, owner, other_team):
    theirs = Environment.objects.create(team=other_team, name="theirs")
    theirs.change_secrets({"THEIR_TOKEN": {"value": "their-value-123"}}, new_revision=False)
    response = client_for(owner).post(SERVERS, body(headers={"X-Key": "${THEIR_TOKEN}"}), format="json")
    assert response.status_code == 400 and "X-Key" in response.json()["errors"]["headers"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://169.254.169.254/mcp", "metadata"),
        ("http://10.0.0.7/mcp", "private"),
        ("ftp://127.0.0.1/mcp", "scheme"),
        ("http://user:pw@127.0.0.1/mcp", "credentials"),
        ("", ""),
    ],
)
def test_it_refuses_a_url_the_address_rules_refuse(loopback_allowed, owner, url, words):
    response = client_for(owner).post(SERVERS, body(url=url, headers={}), format="json")
    assert response.status_code == 400
    (message,) = response.json()["errors"]["url"]
    assert words in message
    assert not McpServer.objects.exists()


def test_it_refuses_loopback_unless_the_operator_allows_it(owner):
    response = client_for(owner).post(SERVERS, body(headers={}), format="json")
    assert response.status_code == 400
    assert "DEPUTIES_MCP_ALLOWED_NETWORKS" in response.json()["errors"]["url"][0]


@pytest.mark.parametrize("name", ["has__double", "Upper", "-dash", "x" * 41, ""])
def test_it_refuses_a_name_that_is_not_a_tool_namespace(loopback_allowed, owner, name):
    response = client_for(owner).post(SERVERS, body(name=name, headers={}), format="json")
    assert response.status_code == 400 and list(response.json()["errors"]) == ["name"]


def test_it_refuses_a_name_the_team_already_has(loopback_allowed, owner, team, other_team):
    McpServer.objects.create(team=other_team, name="docs", url=URL)  # another team's: no clash
    client = client_for(owner)
    assert client.post(SERVERS, body(headers={}), format="json").status_code == 201
    clash = client.post(SERVERS, body(headers={}), format="json")
    assert clash.status_code == 400 and list(clash.json()["errors"]) == ["name"]
    wiki = client.post(SERVERS, body(name="wiki", headers={}), format="json").json()
    renamed = client.patch(f"{SERVERS}/{wiki['id']}", {"name": "docs"}, format="json")
    assert renamed.status_code == 400 and "name" in renamed.json()["errors"]


def test_it_keeps_servers_to_their_team(loopback_allowed, owner, viewer, outsider, team):
    server = McpServer.objects.create(team=team, name="docs", url=URL)
    assert [s["name"] for s in client_for(viewer).get(SERVERS).json()["results"]] == ["docs"]
    assert client_for(outsider).get(SERVERS).json()["results"] == []
    for method in ("get", "patch", "delete"):
        response = getattr(client_for(outsider), method)(f"{SERVERS}/{server.pk}", {}, format="json")
        assert response.status_code == 404, method
    assert (
        client_for(viewer).patch(f"{SERVERS}/{server.pk}", {"enabled": False}, format="json").status_code
        == 403
    )
    assert client_for(viewer).post(SERVERS, body(name="v", headers={}), format="json").status_code == 403
    assert McpServer.objects.get().enabled is True


# --- the dashboard ----------------------------------------------------------------------------------


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_manages_servers_on_their_page(loopback_allowed, secret, owner, team):
    client = login(owner)
    page = client.get("/mcp-servers").content.decode()
    assert 'href="/mcp-servers" aria-current="page"' in page  # in the nav
    created = client.post(
        "/mcp-servers",
        {
            "team": team.pk,
            "name": "docs",
            "url": URL,
            "headers": json.dumps({"Authorization": "Bearer ${MCP_TOKEN}"}),
            "enabled": "on",
        },
    )
    assert created.status_code == 302, created.content.decode()[:3000]
    server = McpServer.objects.get()
    page = client.get("/mcp-servers").content.decode()
    assert f'data-mcp-server-id="{server.pk}"' in page and URL in page
    detail = client.get(f"/mcp-servers/{server.pk}").content.decode()
    assert "Bearer ${MCP_TOKEN}" in detail and TOKEN not in detail + page
    assert "docs__" in page  # how its tools are named

    edited = client.post(
        f"/mcp-servers/{server.pk}",
        {"name": "docs", "url": URL, "headers": "{}", "timeout_seconds": "30"},  # "enabled" unticked
    )
    assert edited.status_code == 302, edited.content.decode()[:3000]
    server.refresh_from_db()
    assert (server.enabled, server.timeout_seconds, server.headers) == (False, 30.0, {})
    assert client.post(f"/mcp-servers/{server.pk}/delete").status_code == 302
    assert not McpServer.objects.exists()


def test_it_shows_the_serializers_errors_at_the_field(loopback_allowed, secret, owner, team):
    response = login(owner).post(
        "/mcp-servers",
        {"team": team.pk, "name": "docs", "url": URL, "headers": json.dumps({"Authorization": "Bearer raw"})},
    )
    assert response.status_code == 400
    page = response.content.decode()
    assert "field-headers" in page and "take it from a secret" in page
    assert not McpServer.objects.exists()


def test_it_lets_a_viewer_read_but_not_write_and_hides_servers_from_outsiders(viewer, outsider, team):
    server = McpServer.objects.create(team=team, name="docs", url=URL, headers={"X-Tenant": "acme"})
    client = login(viewer)
    page = client.get(f"/mcp-servers/{server.pk}").content.decode()
    assert "read-only" in page and URL in page
    assert client.post(f"/mcp-servers/{server.pk}", {"name": "x", "url": URL}).status_code == 403
    assert client.post("/mcp-servers", {"team": team.pk, "name": "n", "url": URL}).status_code == 403
    assert client.post(f"/mcp-servers/{server.pk}/delete").status_code == 403
    assert login(outsider).get(f"/mcp-servers/{server.pk}").status_code == 404
    assert "data-mcp-server-id" not in login(outsider).get("/mcp-servers").content.decode()


def test_it_applies_the_same_checks_in_the_admin(loopback_allowed, secret, django_user_model, team):
    client = login(django_user_model.objects.create_superuser("root", "root@example.com", "pw"))
    form = {"team": team.pk, "name": "docs", "url": URL, "enabled": "on", "timeout_seconds": ""}
    add = "/admin/agent_sessions/mcpserver/add/"
    refused = client.post(add, {**form, "headers": json.dumps({"Authorization": "Bearer raw-token"})})
    assert refused.status_code == 200 and "take it from a secret" in refused.content.decode()
    refused = client.post(add, {**form, "url": "http://169.254.169.254/mcp", "headers": "{}"})
    assert refused.status_code == 200 and "metadata" in refused.content.decode()
    assert not McpServer.objects.exists()
    added = client.post(add, {**form, "headers": json.dumps({"Authorization": "Bearer ${MCP_TOKEN}"})})
    assert added.status_code == 302
    assert McpServer.objects.get().headers == {"Authorization": "Bearer ${MCP_TOKEN}"}

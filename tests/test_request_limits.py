"""Oversized request bodies are a 413 naming the limit, on every API write, on pages and through daphne."""

from __future__ import annotations

import json

import httpx
import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.urls import reverse

from integrations.slack.models import SlackChannel, SlackWorkspace
from integrations.webhooks.models import WebhookSource
from sessions.api.schema import Generator
from sessions.automations import Automation
from sessions.models import AgentProfile, APIToken, Environment, McpServer, Session, Skill, start_session
from tests.conftest import client_for
from tests.live import child_env, web_process

TEN_MB = 10 * 1024 * 1024


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.DEFAULT_MODEL = "scripted/demo"


@pytest.fixture
def session(team, owner, repository) -> Session:
    return start_session(
        team=team, repository=repository, prompt="Fix it", model="scripted/demo", created_by=owner
    )


@pytest.fixture
def environment(team) -> Environment:
    return Environment.objects.create(team=team, name="python", image="python:3.12-slim")


def operations_with_a_body() -> list[tuple[str, str]]:
    """Every operation of the published schema that takes a request body."""
    schema = Generator().get_schema(request=None, public=True)
    return sorted(
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "requestBody" in operation
    )


def oversized_json() -> str:
    return json.dumps({"prompt": "x" * TEN_MB, "content": "x", "name": "big", "url": "/srv/big"})


def assert_names_the_limit(response) -> None:
    assert response.status_code == 413, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    limit = django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert body["code"] == "request_too_large"
    assert body["limit_bytes"] == limit
    assert str(limit) in body["detail"] and "DEPUTIES_MAX_REQUEST_BYTES" in body["detail"]


def test_it_answers_413_naming_the_limit_for_a_10_mb_body_on_every_api_write(
    owner, session, repository, environment
):
    source = WebhookSource(team=session.team, name="ci", slug="ci", auth="token", repository=repository)
    source.issue_credentials()
    source.save()
    profile = AgentProfile.objects.create(team=session.team, name="p")
    skill = Skill.objects.create(team=session.team, name="s", description="d", body="b")
    workspace = SlackWorkspace.objects.create(slack_team_id="T0LIMITS", name="w", team=session.team)
    channel = SlackChannel.objects.create(
        team=session.team, name="#c", workspace=workspace, channel_id="C0LIMITS"
    )
    ids = {
        "sessions": session.pk,
        "repositories": repository.pk,
        "environments": environment.pk,
        "webhook-sources": source.pk,
        "agent-profiles": profile.pk,
        "skills": skill.pk,
        "mcp-servers": McpServer.objects.create(
            team=session.team, name="m", url="https://mcp.example.com"
        ).pk,
        "slack-channels": channel.pk,
        "automations": Automation.objects.create(
            team=session.team, name="a", cron="0 * * * *", prompt="p", repository=repository
        ).pk,
        "messages": session.messages.get().pk,
    }
    operations = operations_with_a_body()
    assert ("POST", "/api/v1/sessions") in operations
    assert ("POST", "/api/v1/sessions/{id}/messages") in operations
    assert ("PATCH", "/api/v1/environments/{id}") in operations
    client = client_for(owner)
    body = oversized_json()
    for method, path in operations:
        # Each {placeholder} takes the id of the resource named just before it.
        parts = path.split("/")
        url = "/".join(str(ids[parts[i - 1]]) if p.startswith("{") else p for i, p in enumerate(parts))
        response = client.generic(method, url, body, content_type="application/json")
        assert_names_the_limit(response)
    assert session.messages.count() == 1  # nothing half-written
    assert Session.objects.count() == 1


def test_it_accepts_the_longest_prompt_in_its_most_expensive_encoding(owner, repository, settings):
    # One character outside the BMP, JSON-escaped as a surrogate pair: 12 bytes per character.
    prompt = "\U0001f600" * settings.MAX_PROMPT_CHARS
    body = json.dumps({"repository": repository.pk, "prompt": prompt}, ensure_ascii=True)
    assert len(body) > 12 * settings.MAX_PROMPT_CHARS
    response = client_for(owner).post("/api/v1/sessions", body, content_type="application/json")
    assert response.status_code == 201, response.content[:500]
    assert Session.objects.get(pk=response.json()["id"]).messages.get().content == prompt


def test_it_shows_a_413_page_for_an_oversized_form(owner, repository):
    client = Client()
    client.force_login(owner)
    response = client.post(
        reverse("session-new"),
        {"repository": repository.pk, "prompt": "x" * TEN_MB},
        HTTP_ACCEPT="text/html,application/xhtml+xml",
    )
    assert response.status_code == 413
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "too large" in page and "nothing was saved" in page
    assert Session.objects.count() == 0


def test_it_answers_413_in_json_for_an_oversized_body_to_a_plain_view(owner):
    client = Client()
    client.force_login(owner)
    response = client.post(reverse("session-new"), {"prompt": "x" * TEN_MB})  # no Accept: not a browser
    assert_names_the_limit(response)


@pytest.mark.asyncio
async def test_it_keeps_one_byte_past_the_limit_of_a_long_body_and_drops_the_rest(settings):
    from deputies.asgi_handler import PooledASGIHandler

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100_000
    messages = [{"type": "http.request", "body": b"x" * 30_000, "more_body": True} for _ in range(10)]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive():
        return messages.pop(0)

    body = await PooledASGIHandler().read_body(receive)
    assert len(body.read()) == 100_001 and not messages  # the whole body was read, not all kept
    short = [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}]

    async def receive_short():
        return short.pop(0)

    assert (await PooledASGIHandler().read_body(receive_short)).read() == b'{"a": 1}'


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_it_answers_413_through_daphne_with_and_without_a_content_length(tmp_path, owner, repository):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("daphne and the test share the database: needs Postgres")
    _, secret = APIToken.issue(owner)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = child_env(data_dir, DEPUTIES_DEFAULT_MODEL="scripted/demo", DEPUTIES_LLM_PROVIDERS="scripted")
    env["DEPUTIES_LLM_SCRIPTED_BASE_URL"] = "http://127.0.0.1:9/v1"
    payload = json.dumps({"repository": repository.pk, "prompt": "x" * TEN_MB}).encode()

    def chunks(data: bytes):
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    with web_process(env) as base, httpx.Client(base_url=base, timeout=60) as http:
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        response = http.post("/api/v1/sessions", content=payload, headers=headers)
        assert response.status_code == 413, response.text[:500]
        assert response.json()["limit_bytes"] == django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        # Chunked, so no Content-Length to go by: the form's CSRF check reads the body and stops
        # at the limit (deputies/asgi_handler.py keeps one byte more, not ten megabytes).
        form = b"prompt=" + b"x" * TEN_MB
        response = http.post(
            "/sessions/new",
            content=chunks(form),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "text/html",
                "Cookie": f"{django_settings.CSRF_COOKIE_NAME}={'a' * 32}",
            },
        )
        assert response.status_code == 413, response.text[:500]
        assert "too large" in response.text
        # The limit is a limit, not a broken server: a normal request still works.
        ok = http.post(
            "/api/v1/sessions", json={"repository": repository.pk, "prompt": "Hi"}, headers=headers
        )
        assert ok.status_code == 201, ok.text
    assert Session.objects.count() == 1

"""The OpenAPI schema is true: a seeded, bounded schemathesis run against a live server finds nothing.

Real processes: ``deputies web`` (daphne) on loopback over the test database, and the schemathesis CLI
(configured by ``tests/schemathesis.toml``) authenticated as a team member with a bearer token. The
team has one of everything (ids start at 1 and the generator is deterministic, so the same cases
reach the same objects every run), so successful responses are checked against the schema too, not
only errors. Sessions the run creates are only queued: no worker runs here, and the database is
flushed afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from django.db import connection
from rest_framework.test import APIClient

from integrations.webhooks.models import WebhookSource
from sandboxes.models import Sandbox
from sessions.api.schema import Generator
from sessions.artifacts import store_artifact
from sessions.events import emit_many
from sessions.models import APIToken, Environment, McpServer, Session, start_session
from tests.conftest import client_for
from tests.live import child_env, web_process

CONFIG = Path(__file__).with_name("schemathesis.toml")


def schema_operations() -> set[str]:
    schema = Generator().get_schema(request=None, public=True)
    return {
        f"{method.upper()} {path}"
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict)
    }


@pytest.fixture
def one_of_everything(settings, tmp_path, team, teammate, repository):
    """A session with events, an artifact and a sandbox, a finished session with a pull request, an
    environment with a secret, an MCP server and a webhook source: every kind of object the API
    shows, at id 1."""
    settings.MEDIA_ROOT = tmp_path / "data" / "media"  # where the web process reads artifacts
    environment = Environment.objects.create(team=team, name="python", image="python:3.12-slim")
    environment.change_secrets(
        {"API_TOKEN": {"value": "s3cret-value-1234", "sandbox_visible": True}}, new_revision=False
    )
    session = start_session(
        team=team,
        repository=repository,
        prompt="Fix the adder",
        model="scripted/demo",
        created_by=teammate,
        environment=environment,
    )
    emit_many(session.pk, [("progress", {"message": "working"}), ("assistant_text", {"text": "Done."})])
    store_artifact(session.pk, "diff", "changes.diff", "--- a\n+++ b\n", content_type="text/x-diff")
    Sandbox.objects.create(session=session, provider="local", status="ready", isolated=False)
    McpServer.objects.create(
        team=team,
        name="docs",
        url="https://mcp.example.com/mcp",
        headers={"Authorization": "Bearer ${API_TOKEN}"},
        timeout_seconds=30,
    )
    source = WebhookSource(team=team, name="ci", slug="ci", auth="token", repository=repository)
    source.issue_credentials()
    source.save()
    done = start_session(
        team=team, repository=repository, prompt="Open a PR", model="scripted/demo", created_by=teammate
    )
    Session.objects.filter(pk=done.pk).update(
        status="completed", pull_request_url="https://github.com/acme/widgets/pull/7", branch="deputies/7"
    )
    return session


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True, reset_sequences=True)
def test_it_conforms_to_its_openapi_schema_under_a_seeded_schemathesis_run(
    tmp_path, teammate, one_of_everything
):
    if connection.vendor != "postgresql":
        pytest.skip("daphne and the test share the database: needs Postgres")
    _, secret = APIToken.issue(teammate, "conformance")
    data_dir = tmp_path / "data"
    env = child_env(
        data_dir,
        DEPUTIES_LLM_PROVIDERS="scripted",
        DEPUTIES_LLM_SCRIPTED_BASE_URL="http://127.0.0.1:9/v1",  # never called: no worker runs
        DEPUTIES_DEFAULT_MODEL="scripted/demo",
        # Every case should reach the API, but a few session starts meet the limit, so 429s are
        # checked against the schema too.
        DEPUTIES_API_RATE="0",
        DEPUTIES_API_RATE_SESSIONS="20/min",
    )
    junit = tmp_path / "schemathesis.xml"
    with web_process(env) as base:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file",
                str(CONFIG),
                "run",
                f"{base}/api/schema/",
                "--no-color",
                "--report",
                "junit",
                "--report-junit-path",
                str(junit),
            ],
            # The token reaches the config's ${DEPUTIES_CONFORMANCE_TOKEN}, not the command line.
            env={**env, "DEPUTIES_CONFORMANCE_TOKEN": secret},
            cwd=tmp_path,  # schemathesis keeps its state in ./.schemathesis
            capture_output=True,
            text=True,
            timeout=300,
        )
    output = run.stdout + run.stderr
    print(output[-2500:])  # the summary: phases, cases, time
    assert run.returncode == 0, output[-12000:]
    tested = {case.get("name") for case in ET.parse(junit).getroot().iter("testcase")}
    assert schema_operations() <= tested, (schema_operations() - tested, output[-3000:])


# --- what the schemathesis run found, pinned as fast tests ---------------------------------------


@pytest.fixture
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.DEFAULT_MODEL = "scripted/demo"


@pytest.fixture
def schema() -> dict:
    return Generator().get_schema(request=None, public=True)


def parameter(schema: dict, path: str, method: str, name: str) -> dict:
    operation = schema["paths"][path][method]
    return next(p for p in operation["parameters"] if p["name"] == name)


@pytest.mark.parametrize(
    "query, field",
    [
        ("limit=0/0", "limit"),
        ("limit=0", "limit"),
        ("limit=64446792564992253452353536", "limit"),  # was a 500: past a bigint
        ("offset=-10000000", "offset"),
        ("offset=ten", "offset"),
        ("limit=", "limit"),
    ],
)
def test_it_rejects_page_parameters_outside_the_schema_naming_them(owner, query, field):
    response = client_for(owner).get(f"/api/v1/repositories?{query}")
    assert response.status_code == 400, response.content
    assert list(response.json()["errors"]) == [field]


def test_it_rejects_empty_event_parameters(owner, team, repository, providers):
    session = start_session(team=team, repository=repository, prompt="Hi", model="scripted/demo")
    response = client_for(owner).get(f"/api/v1/sessions/{session.pk}/events?after=&limit=")
    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"after"}


def test_it_documents_the_bounds_it_enforces_on_query_parameters(schema):
    events = "/api/v1/sessions/{id}/events"
    assert parameter(schema, events, "get", "after")["schema"]["minimum"] == 0
    assert parameter(schema, events, "get", "limit")["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 1000,
    }
    listing = "/api/v1/sessions"
    assert parameter(schema, listing, "get", "limit")["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 1000,
    }
    assert parameter(schema, listing, "get", "offset")["schema"]["minimum"] == 0
    assert parameter(schema, events, "get", "id")["schema"]["type"] == "integer"


def test_it_documents_every_error_answer_with_a_json_body(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "401" in responses, (method, path)
            if "{id}" in path:
                assert "404" in responses, (method, path)
            if "requestBody" in operation:
                assert {"400", "403", "413"} <= set(responses), (method, path)
                assert set(operation["requestBody"]["content"]) == {"application/json"}
            for code, response in responses.items():
                if code >= "400":
                    assert "application/json" in response["content"], (method, path, code)


def test_it_does_not_call_an_empty_pull_request_url_a_uri(schema, owner, team, repository, providers):
    assert "format" not in schema["components"]["schemas"]["Session"]["properties"]["pull_request_url"]
    session = start_session(team=team, repository=repository, prompt="Hi", model="scripted/demo")
    assert client_for(owner).get(f"/api/v1/sessions/{session.pk}").json()["pull_request_url"] == ""


def test_it_answers_400_not_500_for_null_characters(owner, team, repository, providers):
    client = client_for(owner)
    search = client.get("/api/v1/sessions", {"search": "a\x00b"})
    assert search.status_code == 400 and "search" in search.json()["errors"]
    team_ref = client.post(
        "/api/v1/repositories", {"team": "a\x00", "name": "x", "url": "/srv/x"}, format="json"
    )
    assert team_ref.status_code == 400 and "team" in team_ref.json()["errors"]
    env = client.post("/api/v1/environments", {"name": "e", "env_vars": {"A": "x\x00y"}}, format="json")
    assert env.status_code == 400 and "env_vars" in env.json()["errors"]


def test_it_takes_text_fields_only_as_strings(owner, team, repository, providers):
    client = client_for(owner)
    prompt = client.post("/api/v1/sessions", {"repository": repository.pk, "prompt": 0}, format="json")
    assert prompt.status_code == 400 and "prompt" in prompt.json()["errors"]
    name = client.post("/api/v1/repositories", {"name": 7, "url": "/srv/x"}, format="json")
    assert name.status_code == 400 and "name" in name.json()["errors"]
    assert Session.objects.count() == 0


def test_it_answers_an_unknown_api_path_with_json_whatever_the_cookies(owner):
    client = APIClient(enforce_csrf_checks=True)  # as a browser's request is checked
    client.cookies["sessionid"] = "not-a-session"
    client.cookies["csrftoken"] = "a" * 32
    response = client.delete("/api/v1/environments/%C2%84")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_it_says_a_download_error_is_json(owner):
    response = client_for(owner).get("/api/v1/artifacts/999/download?format=binary")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"

"""Every endpoint against every kind of caller, on real objects.

anonymous -> 401; owner and teammate -> the endpoint works; viewer -> reads work, writes 403;
outsider (owner of another team) -> 404 for the team's objects, and team collections look empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from rest_framework.test import APIClient

from sessions.artifacts import store_artifact
from sessions.models import Environment, Repository, Session, start_session
from tests.conftest import client_for


@dataclass
class World:
    session: Session
    repository: Repository
    spare_repository: Repository  # no sessions, so it can be deleted
    environment: Environment
    artifact_id: int


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # formatted with the World's attributes
    ok: int
    body: dict[str, Any] | None = None
    outsider: int = 404  # what someone from another team gets
    write: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "write", self.method not in ("GET", "HEAD", "OPTIONS"))

    def call(self, client: APIClient, world: World):
        values = {
            "session": world.session.pk,
            "repository": world.repository.pk,
            "spare": world.spare_repository.pk,
            "environment": world.environment.pk,
            "artifact": world.artifact_id,
        }
        path = self.path.format(**values)
        body = {k: (v.format(**values) if isinstance(v, str) else v) for k, v in (self.body or {}).items()}
        return getattr(client, self.method.lower())(path, body if self.write else None, format="json")


ENDPOINTS = [
    # sessions
    Endpoint("GET", "/api/v1/sessions", 200, outsider=200),
    Endpoint(
        "POST",
        "/api/v1/sessions",
        201,
        {"repository": "{repository}", "prompt": "Do it", "model": "scripted/demo"},
        outsider=400,  # "unknown repository": the same answer as for one that does not exist
    ),
    Endpoint("GET", "/api/v1/sessions/{session}", 200),
    Endpoint("POST", "/api/v1/sessions/{session}/messages", 201, {"content": "And this"}),
    Endpoint("POST", "/api/v1/sessions/{session}/cancel", 200),
    Endpoint("GET", "/api/v1/sessions/{session}/events", 200),
    Endpoint("GET", "/api/v1/sessions/{session}/artifacts", 200),
    # artifacts
    Endpoint("GET", "/api/v1/artifacts/{artifact}", 200),
    Endpoint("GET", "/api/v1/artifacts/{artifact}/download", 200),
    # repositories
    Endpoint("GET", "/api/v1/repositories", 200, outsider=200),
    Endpoint(
        "POST",
        "/api/v1/repositories",
        201,
        {"team": "alpha", "name": "new", "url": "https://127.0.0.1/acme/new.git"},
        outsider=400,  # "unknown team"
    ),
    Endpoint("GET", "/api/v1/repositories/{repository}", 200),
    Endpoint("PATCH", "/api/v1/repositories/{repository}", 200, {"default_branch": "develop"}),
    Endpoint(
        "PUT",
        "/api/v1/repositories/{repository}",
        200,
        {"name": "renamed", "url": "https://127.0.0.1/acme/renamed.git", "default_branch": "main"},
    ),
    Endpoint("DELETE", "/api/v1/repositories/{spare}", 204),
    # environments
    Endpoint("GET", "/api/v1/environments", 200, outsider=200),
    Endpoint("POST", "/api/v1/environments", 201, {"team": "alpha", "name": "node"}, outsider=400),
    Endpoint("GET", "/api/v1/environments/{environment}", 200),
    Endpoint("PATCH", "/api/v1/environments/{environment}", 200, {"setup_script": "make deps"}),
    Endpoint("PUT", "/api/v1/environments/{environment}", 200, {"name": "python", "image": "python:3.12"}),
    Endpoint("DELETE", "/api/v1/environments/{environment}", 204),
]

IDS = [f"{e.method} {e.path}" for e in ENDPOINTS]


@pytest.fixture(autouse=True)
def providers(settings, tmp_path, loopback_remotes):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def world(team, owner, teammate, viewer, outsider, repository) -> World:
    session = start_session(
        team=team, repository=repository, prompt="Fix it", model="scripted/demo", created_by=owner
    )
    artifact = store_artifact(session.pk, "diff", "changes.diff", "diff --git a/x b/x\n")
    return World(
        session=session,
        repository=repository,
        spare_repository=Repository.objects.create(
            team=team, name="spare", url="/srv/spare", provider="local"
        ),
        environment=Environment.objects.create(team=team, name="python"),
        artifact_id=artifact.pk,
    )


def consume(response) -> None:
    if getattr(response, "streaming", False):
        b"".join(response.streaming_content)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=IDS)
def test_it_answers_401_to_anonymous_callers(endpoint, world):
    response = endpoint.call(APIClient(), world)
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


@pytest.mark.parametrize("role", ["owner", "teammate"])
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=IDS)
def test_it_lets_owners_and_members_use_every_endpoint(endpoint, role, world, request):
    response = endpoint.call(client_for(request.getfixturevalue(role)), world)
    consume(response)
    assert response.status_code == endpoint.ok, getattr(response, "data", None)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=IDS)
def test_it_lets_viewers_read_but_not_write(endpoint, world, viewer):
    response = endpoint.call(client_for(viewer), world)
    consume(response)
    if endpoint.write:
        assert response.status_code == 403
        assert "read-only" in response.json()["detail"]
    else:
        assert response.status_code == endpoint.ok


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=IDS)
def test_it_hides_a_teams_objects_from_outsiders(endpoint, world, outsider):
    before = (Session.objects.count(), Repository.objects.count(), Environment.objects.count())
    response = endpoint.call(client_for(outsider), world)
    consume(response)
    assert response.status_code == endpoint.outsider
    if response.status_code >= 400:
        assert response.json()["detail"]
    else:
        assert response.json()["count"] == 0  # a collection with nothing of the team's in it
    assert (Session.objects.count(), Repository.objects.count(), Environment.objects.count()) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=IDS)
def test_it_lets_staff_use_every_endpoint(endpoint, world, django_user_model):
    staff = django_user_model.objects.create_user("operator", is_staff=True)
    response = endpoint.call(client_for(staff), world)
    consume(response)
    assert response.status_code == endpoint.ok, getattr(response, "data", None)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/api/schema/", "/api/docs/"])
def test_it_serves_probes_and_docs_without_authentication(path):
    assert APIClient().get(path).status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/nothing-here", "/api/v2/sessions", "/api/v1/sessions/1/nope"])
def test_it_answers_unknown_api_paths_in_json(path, owner):
    response = client_for(owner).get(path)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"

"""Repositories and environments over the API, plus the probes and the API's own documentation."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django_q.models import OrmQ

from sessions.models import Environment, Membership, Repository, Role, start_session
from tests.conftest import client_for

REPOSITORIES = "/api/v1/repositories"
ENVIRONMENTS = "/api/v1/environments"
OTHER = "https://127.0.0.1/acme/other.git"


@pytest.fixture(autouse=True)
def remotes(loopback_remotes):
    """Remote URLs here are on loopback (no DNS, no traffic: nothing clones them), allowed on purpose."""


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }


# --- repositories -------------------------------------------------------------------------------------


def test_it_creates_a_repository_in_the_only_writable_team(owner, team):
    response = client_for(owner).post(
        REPOSITORIES, {"name": "widgets", "url": "https://127.0.0.1/acme/widgets.git"}, format="json"
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["team"] == {"id": team.pk, "slug": "alpha", "name": "Alpha"}
    assert (body["provider"], body["default_branch"]) == ("git", "main")
    assert Repository.objects.get(pk=body["id"]).team == team


def test_it_derives_the_provider_from_the_url_unless_given(owner, sample_repo):
    client = client_for(owner)
    local = client.post(REPOSITORIES, {"name": "here", "url": str(sample_repo)}, format="json").json()
    assert local["provider"] == "local"
    given = client.post(
        REPOSITORIES, {"name": "mirror", "url": "https://127.0.0.1/a/b", "provider": "github"}, format="json"
    ).json()
    assert given["provider"] == "github"
    moved = client.patch(f"{REPOSITORIES}/{local['id']}", {"url": "https://127.0.0.1/a/here"}, format="json")
    assert moved.json()["provider"] == "git"


def test_it_keeps_repository_names_unique_per_team(owner, outsider, repository):
    response = client_for(owner).post(REPOSITORIES, {"name": "sample", "url": OTHER}, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["name"]
    # Another team may use the name.
    theirs = client_for(outsider).post(REPOSITORIES, {"name": "sample", "url": OTHER}, format="json")
    assert theirs.status_code == 201
    # Renaming onto a taken name is refused too.
    spare = Repository.objects.create(team=repository.team, name="spare", url="/srv/spare")
    rename = client_for(owner).patch(f"{REPOSITORIES}/{spare.pk}", {"name": "sample"}, format="json")
    assert rename.status_code == 400
    assert list(rename.json()["errors"]) == ["name"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "url": "not a url"}, "url"),
        ({"name": "x", "url": "--upload-pack=evil"}, "url"),
        ({"name": "x", "url": OTHER, "default_branch": "-f"}, "default_branch"),
        ({"name": "", "url": OTHER}, "name"),
        ({"url": OTHER}, "name"),
        ({"name": "x", "url": OTHER, "provider": "svn"}, "provider"),
        ({"name": "x", "url": OTHER, "team": "nope"}, "team"),
    ],
)
def test_it_validates_repositories(owner, body, field):
    response = client_for(owner).post(REPOSITORIES, body, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]
    assert not Repository.objects.exists()


def test_it_refuses_to_delete_a_repository_with_sessions(owner, team, repository):
    start_session(team=team, repository=repository, prompt="Go", model="scripted/demo")
    response = client_for(owner).delete(f"{REPOSITORIES}/{repository.pk}")
    assert response.status_code == 409
    assert "1 session(s)" in response.json()["detail"]
    assert Repository.objects.filter(pk=repository.pk).exists()


def test_it_deletes_an_unused_repository(owner, repository):
    assert client_for(owner).delete(f"{REPOSITORIES}/{repository.pk}").status_code == 204
    assert not Repository.objects.exists()


def test_it_does_not_move_objects_between_teams(owner, other_team, repository):
    Membership.objects.create(team=other_team, user=owner, role=Role.OWNER)
    response = client_for(owner).patch(f"{REPOSITORIES}/{repository.pk}", {"team": "beta"}, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["team"]


def test_it_needs_the_team_when_several_are_writable(owner, other_team):
    Membership.objects.create(team=other_team, user=owner, role=Role.MEMBER)
    client = client_for(owner)
    response = client.post(REPOSITORIES, {"name": "x", "url": OTHER}, format="json")
    assert response.status_code == 400
    assert "alpha" in response.json()["errors"]["team"][0]
    by_id = client.post(REPOSITORIES, {"name": "x", "url": OTHER, "team": other_team.pk}, format="json")
    assert by_id.status_code == 201
    assert by_id.json()["team"]["slug"] == "beta"


def test_it_lists_only_the_users_teams(owner, outsider, repository):
    Repository.objects.create(team=outsider.memberships.get().team, name="theirs", url="/srv/theirs")
    names = [r["name"] for r in client_for(owner).get(REPOSITORIES).json()["results"]]
    assert names == ["sample"]


# --- environments -------------------------------------------------------------------------------------


def test_it_bumps_the_environment_revision_on_every_edit(owner, team):
    client = client_for(owner)
    created = client.post(
        ENVIRONMENTS,
        {"name": "python", "image": "python:3.12", "env_vars": {"CI": "1"}, "default_model": "scripted/demo"},
        format="json",
    )
    assert created.status_code == 201, created.json()
    env = created.json()
    assert (env["revision"], env["team"]["slug"], env["network_policy"]) == (1, "alpha", "none")

    patched = client.patch(f"{ENVIRONMENTS}/{env['id']}", {"setup_script": "pip install -e ."}, format="json")
    assert patched.json()["revision"] == 2
    replaced = client.put(
        f"{ENVIRONMENTS}/{env['id']}", {"name": "python", "image": "python:3.13"}, format="json"
    )
    assert replaced.status_code == 200
    assert replaced.json()["revision"] == 3
    assert Environment.objects.get(pk=env["id"]).revision == 3
    # A client cannot set the revision.
    forced = client.patch(f"{ENVIRONMENTS}/{env['id']}", {"revision": 99}, format="json")
    assert forced.json()["revision"] == 4


def test_it_keeps_environment_names_unique_per_team(owner, outsider, team):
    Environment.objects.create(team=team, name="python")
    response = client_for(owner).post(ENVIRONMENTS, {"name": "python"}, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["name"]
    assert client_for(outsider).post(ENVIRONMENTS, {"name": "python"}, format="json").status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"env_vars": {"BAD NAME": "x"}}, "env_vars"),
        ({"env_vars": {"N": 1}}, "env_vars"),
        ({"env_vars": ["x"]}, "env_vars"),
        ({"default_model": "nope/x"}, "default_model"),
        ({"sandbox_provider": "vmware"}, "sandbox_provider"),
        ({"network_policy": "host"}, "network_policy"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_it_validates_environments(owner, body, field):
    response = client_for(owner).post(ENVIRONMENTS, {"name": "e", **body}, format="json")
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not Environment.objects.exists()


def test_it_keeps_sessions_when_an_environment_is_deleted(owner, team, repository):
    environment = Environment.objects.create(team=team, name="python")
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", environment=environment
    )
    assert client_for(owner).delete(f"{ENVIRONMENTS}/{environment.pk}").status_code == 204
    session.refresh_from_db()
    assert (session.environment, session.environment_revision) == (None, 1)


# --- probes and docs ----------------------------------------------------------------------------------


def test_it_answers_healthz_without_the_database():
    # No django_db mark: any query would raise here.
    response = Client().get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.django_db
def test_it_reports_ready_with_database_and_queue():
    response = Client().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["queue"]["status"] == "ok"
    assert body["checks"]["queue"]["queued_tasks"] == 0
    assert isinstance(body["checks"]["queue"]["clusters"], list)


@pytest.mark.django_db
def test_it_reports_not_ready_naming_the_failed_check():
    table = OrmQ._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_gone")
    try:
        response = Client().get("/readyz")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_gone RENAME TO {table}")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["queue"]
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["queue"]["status"] == "error"


@pytest.mark.django_db
def test_it_serves_the_openapi_schema_and_readable_docs():
    schema = Client().get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/api/v1/sessions",
        "/api/v1/sessions/{id}",
        "/api/v1/sessions/{id}/messages",
        "/api/v1/sessions/{id}/cancel",
        "/api/v1/sessions/{id}/events",
        "/api/v1/sessions/{id}/artifacts",
        "/api/v1/artifacts/{id}/download",
        "/api/v1/repositories/{id}",
        "/api/v1/environments/{id}",
    ):
        assert path in paths
    assert schema.json()["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"

    for page in ("/api/docs/",):
        docs = Client().get(page)
        assert docs.status_code == 200
        html = docs.content.decode()
        assert "/static/drf_spectacular_sidecar/" in html  # the UI's assets are served by us
        assert "cdn" not in html.lower()  # works offline: nothing loaded from a CDN

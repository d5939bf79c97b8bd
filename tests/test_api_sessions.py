"""The sessions API: starting, listing, following, cancelling, artifacts and authentication."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import OrmQ
from rest_framework.test import APIClient

from sandboxes.models import Sandbox
from sessions.artifacts import store_artifact
from sessions.events import emit_many
from sessions.models import (
    APIToken,
    Environment,
    Event,
    Membership,
    Message,
    Repository,
    Role,
    Run,
    Session,
    SessionStatus,
    start_session,
)
from tests.conftest import client_for

SESSIONS = "/api/v1/sessions"


@pytest.fixture(autouse=True)
def providers(settings, loopback_remotes):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.DEFAULT_MODEL = ""


@pytest.fixture
def other_repository(other_team) -> Repository:
    return Repository.objects.create(team=other_team, name="theirs", url="/srv/theirs", provider="local")


@pytest.fixture
def session(team, owner, repository) -> Session:
    return start_session(
        team=team,
        repository=repository,
        prompt="Fix the bug\nin the parser",
        model="scripted/demo",
        created_by=owner,
    )


def rows() -> dict[str, int]:
    return {
        "sessions": Session.objects.count(),
        "messages": Message.objects.count(),
        "runs": Run.objects.count(),
        "events": Event.objects.count(),
        "repositories": Repository.objects.count(),
        "queued": OrmQ.objects.count(),
    }


def start(client: APIClient, body: dict, capture) -> tuple:
    """POST a new session with on-commit callbacks run, so enqueueing is real (an OrmQ row)."""
    with capture(execute=True):
        response = client.post(SESSIONS, body, format="json")
    return response, response.json()


# --- starting a session -------------------------------------------------------------------------------


def test_it_starts_a_session_on_a_repository_by_id(owner, repository, django_capture_on_commit_callbacks):
    response, body = start(
        client_for(owner),
        {"repository": repository.pk, "prompt": "Fix the failing test", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 201, body
    session = Session.objects.get(pk=body["id"])
    assert body["status"] == "queued"
    assert body["source"] == "api"
    assert body["title"] == "Fix the failing test"
    assert body["created_by"] == "owner"
    assert body["team"]["slug"] == "alpha"
    assert body["repository"] == {"id": repository.pk, "name": "sample", "url": repository.url}
    assert body["base_branch"] == "main"
    assert body["branch"] == f"deputies/session-{session.pk}"
    assert body["model"] == "scripted/demo"
    assert body["cost_usd"] == "0.000000"
    assert body["active_run"] == {"id": session.runs.get().pk, "status": "queued", "attempt": 1}
    assert body["pending_messages"] == 1
    assert body["sandbox"] is None
    assert session.messages.get().content == "Fix the failing test"
    assert OrmQ.objects.count() == 1  # the first run was queued after commit


def test_it_starts_a_session_from_a_repository_url(owner, team, django_capture_on_commit_callbacks):
    client = client_for(owner)
    url = "https://127.0.0.1/acme/widgets.git"
    first, body = start(
        client,
        {"repository_url": url, "prompt": "Go", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert first.status_code == 201, body
    repository = Repository.objects.get(pk=body["repository"]["id"])
    assert (repository.team, repository.name, repository.url, repository.provider) == (
        team,
        "widgets",
        url,
        "git",
    )

    again, body = start(
        client,
        {"repository_url": url, "prompt": "Again", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert again.status_code == 201
    assert body["repository"]["id"] == repository.pk  # found, not created twice

    other = "git@127.0.0.2:other/widgets"
    third, body = start(
        client,
        {"repository_url": other, "prompt": "Go", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert third.status_code == 201
    assert body["repository"]["name"] == "widgets-2"
    assert Repository.objects.get(pk=body["repository"]["id"]).provider == "git"


DROP = object()  # remove the key from the body

BAD_INPUTS = [
    ("unknown repository", {"repository": 99999999}, "repository"),
    ("no repository at all", {"repository": DROP}, "repository"),
    ("both repository and url", {"repository_url": "https://127.0.0.1/a/b"}, "repository"),
    ("repository is not a number", {"repository": "abc"}, "repository"),
    (
        "a repository_url that is not a URL",
        {"repository": DROP, "repository_url": "--upload-pack=x"},
        "repository_url",
    ),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("whitespace prompt", {"prompt": "  \n\t "}, "prompt"),
    ("missing prompt", {"prompt": DROP}, "prompt"),
    ("unknown provider", {"model": "nope/gpt"}, "model"),
    ("model without provider", {"model": "gpt-4o"}, "model"),
    ("unknown environment", {"environment": 99999999}, "environment"),
    ("a branch that is an option", {"base_branch": "--force"}, "base_branch"),
    ("unknown team", {"team": "no-such-team"}, "team"),
]


@pytest.mark.parametrize(("case", "change", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_it_rejects_bad_input_naming_the_field(
    case, change, field, owner, repository, django_capture_on_commit_callbacks
):
    body = {"repository": repository.pk, "prompt": "Fix it", "model": "scripted/demo"}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not DROP}
    before = rows()
    response, data = start(client_for(owner), body, django_capture_on_commit_callbacks)
    assert response.status_code == 400, data
    assert field in data["errors"], data
    assert field in data["detail"]
    assert rows() == before  # nothing written, nothing queued


def test_it_does_not_reveal_another_teams_repository(
    owner, other_repository, django_capture_on_commit_callbacks
):
    before = rows()
    response, data = start(
        client_for(owner),
        {"repository": other_repository.pk, "prompt": "Fix it", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400
    unknown, _ = start(
        client_for(owner),
        {"repository": 99999999, "prompt": "Fix it", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    # The same words for "someone else's" and "does not exist".
    assert data["errors"]["repository"][0].replace(str(other_repository.pk), "N") == unknown.json()["errors"][
        "repository"
    ][0].replace("99999999", "N")
    assert rows() == before


def test_it_rejects_another_teams_environment(
    owner, repository, other_team, django_capture_on_commit_callbacks
):
    theirs = Environment.objects.create(team=other_team, name="theirs")
    response, data = start(
        client_for(owner),
        {"repository": repository.pk, "prompt": "Go", "model": "scripted/demo", "environment": theirs.pk},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400
    assert list(data["errors"]) == ["environment"]


def test_it_rejects_an_oversize_prompt_stating_the_limit(
    owner, repository, settings, django_capture_on_commit_callbacks
):
    settings.MAX_PROMPT_CHARS = 50
    before = rows()
    response, data = start(
        client_for(owner),
        {"repository": repository.pk, "prompt": "x" * 51, "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400
    assert "50" in data["errors"]["prompt"][0]
    assert rows() == before


def test_it_lists_the_configured_providers_for_a_bad_model(
    owner, repository, django_capture_on_commit_callbacks
):
    response, data = start(
        client_for(owner),
        {"repository": repository.pk, "prompt": "Go", "model": "openai/gpt-4o"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400
    assert "scripted" in data["errors"]["model"][0]


def test_it_answers_malformed_json_with_a_json_400(owner, repository):
    before = rows()
    response = client_for(owner).post(SESSIONS, data='{"prompt": "x",', content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert rows() == before


def test_it_answers_a_json_list_with_a_400(owner):
    response = client_for(owner).post(SESSIONS, data="[1, 2]", content_type="application/json")
    assert response.status_code == 400
    assert "JSON object" in response.json()["detail"]


def test_it_answers_a_wrong_content_type_with_a_json_415(owner):
    response = client_for(owner).post(SESSIONS, data="prompt=x", content_type="text/plain")
    assert response.status_code == 415
    assert "text/plain" in response.json()["detail"]


def test_it_takes_the_model_from_the_environment_then_the_settings(
    owner, team, repository, settings, django_capture_on_commit_callbacks
):
    environment = Environment.objects.create(team=team, name="py", default_model="scripted/env-model")
    client = client_for(owner)
    response, body = start(
        client,
        {"repository": repository.pk, "prompt": "Go", "environment": environment.pk},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 201, body
    assert body["model"] == "scripted/env-model"
    assert body["environment"] == {"id": environment.pk, "name": "py"}
    assert body["environment_revision"] == 1

    response, body = start(
        client, {"repository": repository.pk, "prompt": "Go"}, django_capture_on_commit_callbacks
    )
    assert response.status_code == 400
    assert "No model given" in body["errors"]["model"][0]

    settings.DEFAULT_MODEL = "scripted/default"
    response, body = start(
        client, {"repository": repository.pk, "prompt": "Go"}, django_capture_on_commit_callbacks
    )
    assert response.status_code == 201
    assert body["model"] == "scripted/default"


def test_it_needs_a_team_when_the_user_can_write_in_several(
    owner, other_team, repository, django_capture_on_commit_callbacks
):
    Membership.objects.create(team=other_team, user=owner, role=Role.MEMBER)
    client = client_for(owner)
    url = "https://127.0.0.1/acme/widgets"
    response, body = start(
        client,
        {"repository_url": url, "prompt": "Go", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400
    assert "team" in body["errors"]

    response, body = start(
        client,
        {"repository_url": url, "prompt": "Go", "model": "scripted/demo", "team": "beta"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 201, body
    assert body["team"]["slug"] == "beta"

    # A repository id implies its team.
    response, body = start(
        client,
        {"repository": repository.pk, "prompt": "Go", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 201, body
    assert body["team"]["slug"] == "alpha"


def test_it_forbids_a_viewer_to_start_a_session(viewer, repository, django_capture_on_commit_callbacks):
    before = rows()
    response, body = start(
        client_for(viewer),
        {"repository": repository.pk, "prompt": "Go", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 403
    assert "read-only" in body["detail"]
    assert rows() == before


# --- reading ------------------------------------------------------------------------------------------


def test_it_shows_a_session_and_says_when_its_sandbox_is_not_isolated(owner, session):
    Sandbox.objects.create(
        session=session,
        provider="local",
        status="ready",
        isolated=False,
        isolation_note="bubblewrap not found",
    )
    body = client_for(owner).get(f"{SESSIONS}/{session.pk}").json()
    assert body["sandbox"] == {
        "provider": "local",
        "isolated": False,
        "isolation_note": "bubblewrap not found",
        "status": "ready",
    }
    assert body["pending_messages"] == 1
    assert body["active_run"]["status"] == "queued"


def test_it_lists_newest_first_with_filters_and_search(owner, team, repository, outsider, other_repository):
    def make(prompt: str, title: str = "") -> Session:
        return start_session(
            team=team, repository=repository, prompt=prompt, model="scripted/demo", title=title
        )

    first = make("Refactor the parser")
    second = make("Add a flag", title="CLI work")
    third = make("Write docs for the parser module")
    Session.objects.filter(pk=second.pk).update(status=SessionStatus.COMPLETED)
    other_repo = Repository.objects.create(team=team, name="other", url="/srv/other", provider="local")
    fourth = start_session(team=team, repository=other_repo, prompt="Elsewhere", model="scripted/demo")
    start_session(
        team=outsider.memberships.get().team,
        repository=other_repository,
        prompt="parser",
        model="scripted/demo",
    )

    client = client_for(owner)

    def ids(query: str = "") -> list[int]:
        response = client.get(f"{SESSIONS}{query}")
        assert response.status_code == 200, response.json()
        return [item["id"] for item in response.json()["results"]]

    assert ids() == [fourth.pk, third.pk, second.pk, first.pk]
    assert ids("?status=completed") == [second.pk]
    assert ids(f"?repository={other_repo.pk}") == [fourth.pk]
    assert ids("?search=PARSER") == [third.pk, first.pk]  # the prompt, case-insensitively
    assert ids("?search=cli") == [second.pk]  # the title
    page = client.get(f"{SESSIONS}?limit=2&offset=1").json()
    assert page["count"] == 4
    assert [item["id"] for item in page["results"]] == [third.pk, second.pk]

    assert client.get(f"{SESSIONS}?status=bogus").json()["errors"].keys() == {"status"}
    assert client.get(f"{SESSIONS}?repository=x").json()["errors"].keys() == {"repository"}


def test_it_shows_staff_every_team(session, db, django_user_model):
    staff = django_user_model.objects.create_user("operator", is_staff=True)
    assert [item["id"] for item in client_for(staff).get(SESSIONS).json()["results"]] == [session.pk]
    assert client_for(staff).post(f"{SESSIONS}/{session.pk}/cancel").status_code == 200


# --- events -------------------------------------------------------------------------------------------


def test_it_pages_events_by_sequence(owner, session):
    emit_many(session.pk, [("progress", {"message": str(i)}) for i in range(10)])
    total = Event.objects.filter(session=session).count()
    client = client_for(owner)
    url = f"{SESSIONS}/{session.pk}/events"

    first = client.get(f"{url}?limit=5").json()
    assert [e["seq"] for e in first["events"]] == [1, 2, 3, 4, 5]
    assert first["next_after"] == 5
    assert set(first["events"][0]) == {"seq", "type", "payload", "created", "run"}

    rest = client.get(f"{url}?after={first['next_after']}").json()
    assert [e["seq"] for e in rest["events"]] == list(range(6, total + 1))
    assert rest["events"][-1]["payload"] == {"message": "9"}
    assert rest["next_after"] == total

    empty = client.get(f"{url}?after={total}").json()
    assert empty == {"events": [], "next_after": total}


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("after=x", "after"),
        ("after=-1", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
    ],
)
def test_it_rejects_bad_event_paging_naming_the_parameter(owner, session, query, param):
    response = client_for(owner).get(f"{SESSIONS}/{session.pk}/events?{query}")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [param]


# --- follow-ups and cancel ------------------------------------------------------------------------------


def test_it_queues_a_follow_up_behind_a_running_run(owner, session, django_capture_on_commit_callbacks):
    client = client_for(owner)
    url = f"{SESSIONS}/{session.pk}/messages"
    run = session.runs.get()

    # The run has not started: it will pick the message up itself.
    response = client.post(url, {"content": "Also update the docs"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["position"] == 2
    assert body["status"] == "pending"
    assert body["queued_behind_active_run"] is False

    run.claim("worker-1")
    queued = OrmQ.objects.count()  # the first run's task (enqueued with the session)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"content": "And the changelog"}, format="json")
    body = response.json()
    assert response.status_code == 201
    assert (body["position"], body["queued_behind_active_run"]) == (3, True)
    assert session.runs.count() == 1  # no second run while one is active
    assert OrmQ.objects.count() == queued

    detail = client.get(f"{SESSIONS}/{session.pk}").json()
    assert detail["pending_messages"] == 1
    assert detail["active_run"]["status"] == "running"


def test_it_starts_a_run_for_a_follow_up_to_a_finished_session(
    owner, session, django_capture_on_commit_callbacks
):
    run = session.runs.get()
    run.claim("w")
    with django_capture_on_commit_callbacks(execute=False):
        run.finish(Run.Status.COMPLETED)
    queued = OrmQ.objects.count()  # the first run's task (enqueued with the session)
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(owner).post(
            f"{SESSIONS}/{session.pk}/messages", {"content": "One more"}, format="json"
        )
    assert response.status_code == 201
    assert response.json()["queued_behind_active_run"] is False
    assert session.runs.filter(status=Run.Status.QUEUED).count() == 1
    assert OrmQ.objects.count() == queued + 1


@pytest.mark.parametrize("content", ["", "   ", None])
def test_it_rejects_an_empty_follow_up(owner, session, content):
    before = rows()
    body = {} if content is None else {"content": content}
    response = client_for(owner).post(f"{SESSIONS}/{session.pk}/messages", body, format="json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["content"]
    assert rows() == before


def test_it_rejects_an_oversize_follow_up(owner, session, settings):
    settings.MAX_PROMPT_CHARS = 10
    response = client_for(owner).post(
        f"{SESSIONS}/{session.pk}/messages", {"content": "y" * 11}, format="json"
    )
    assert response.status_code == 400
    assert "10" in response.json()["errors"]["content"][0]


def test_it_refuses_follow_ups_on_an_archived_session(owner, session):
    Session.objects.filter(pk=session.pk).update(status=SessionStatus.ARCHIVED)
    before = rows()
    response = client_for(owner).post(
        f"{SESSIONS}/{session.pk}/messages", {"content": "hello"}, format="json"
    )
    assert response.status_code == 409
    assert "archived" in response.json()["detail"]
    assert rows() == before


def test_it_cancels_once(owner, session):
    client = client_for(owner)
    response = client.post(f"{SESSIONS}/{session.pk}/cancel")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["active_run"] is None
    assert body["pending_messages"] == 0
    assert session.runs.get().status == Run.Status.CANCELLED

    again = client.post(f"{SESSIONS}/{session.pk}/cancel")
    assert again.status_code == 409
    assert again.json()["detail"] == "The session is already cancelled."


# --- artifacts ----------------------------------------------------------------------------------------


def test_it_round_trips_an_artifact_download(owner, outsider, session, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    data = "diff --git a/x b/x\n+ünïcode line\n"
    artifact = store_artifact(session.pk, "diff", "changes.diff", data, content_type="text/x-diff")

    client = client_for(owner)
    listing = client.get(f"{SESSIONS}/{session.pk}/artifacts").json()
    assert listing["count"] == 1
    item = listing["results"][0]
    assert (item["id"], item["kind"], item["name"], item["size"]) == (
        artifact.pk,
        "diff",
        "changes.diff",
        len(data.encode()),
    )
    assert item["download_url"].endswith(f"/api/v1/artifacts/{artifact.pk}/download")

    response = client.get(f"/api/v1/artifacts/{artifact.pk}/download")
    assert response.status_code == 200
    assert b"".join(response.streaming_content).decode() == data
    assert response["Content-Type"] == "text/x-diff"
    assert response["Content-Disposition"] == 'attachment; filename="changes.diff"'

    # Any Accept header is fine for a download.
    binary = client.get(f"/api/v1/artifacts/{artifact.pk}/download", HTTP_ACCEPT="application/octet-stream")
    assert binary.status_code == 200
    assert (
        b"".join(binary.streaming_content) == data.encode()
    )  # consumed, not closed: close() ends the DB connection

    stranger = client_for(outsider).get(f"/api/v1/artifacts/{artifact.pk}/download")
    assert stranger.status_code == 404
    assert stranger.json()["detail"] == "Not found."


# --- authentication -----------------------------------------------------------------------------------


def test_it_authenticates_with_a_bearer_token(owner, session):
    token, secret = APIToken.issue(owner, name="ci")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    response = client.get(f"{SESSIONS}/{session.pk}")
    assert response.status_code == 200
    token.refresh_from_db()
    assert token.last_used is not None

    # last_used is written at most once a minute.
    stamp = token.last_used
    client.get(SESSIONS)
    token.refresh_from_db()
    assert token.last_used == stamp
    APIToken.objects.filter(pk=token.pk).update(last_used=timezone.now() - timedelta(minutes=2))
    client.get(SESSIONS)
    token.refresh_from_db()
    assert token.last_used > stamp


@pytest.mark.parametrize("header", ["Bearer nope", "Bearer", "Bearer a b", "bearer dep_wrong"])
def test_it_answers_401_for_a_bad_token(session, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get(SESSIONS)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["detail"]


def test_it_answers_401_without_credentials(session):
    response = APIClient().get(f"{SESSIONS}/{session.pk}")
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


def test_it_hides_other_teams_sessions_from_a_token(outsider, session):
    _, secret = APIToken.issue(outsider)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert client.get(f"{SESSIONS}/{session.pk}").status_code == 404
    assert client.post(f"{SESSIONS}/{session.pk}/cancel").status_code == 404
    assert client.get(SESSIONS).json()["count"] == 0


def test_it_rejects_a_token_of_an_inactive_user(owner, session):
    _, secret = APIToken.issue(owner)
    owner.is_active = False
    owner.save()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert client.get(SESSIONS).status_code == 401


def test_it_enforces_csrf_for_cookie_sessions(owner, session):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.get(f"{SESSIONS}/{session.pk}").status_code == 200
    response = client.post(f"{SESSIONS}/{session.pk}/cancel")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert Session.objects.get(pk=session.pk).status == SessionStatus.QUEUED


def test_it_accepts_a_trailing_slash(owner, session):
    assert client_for(owner).get(f"{SESSIONS}/").status_code == 200
    assert client_for(owner).get(f"{SESSIONS}/{session.pk}/").status_code == 200


def test_it_lists_sessions_in_a_fixed_number_of_queries(owner, team, repository):
    client = client_for(owner)

    def list_queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(SESSIONS).status_code == 200
        return len(captured)

    for i in range(2):
        start_session(team=team, repository=repository, prompt=f"task {i}", model="scripted/demo")
    few = list_queries()
    for i in range(5):
        session = start_session(team=team, repository=repository, prompt=f"more {i}", model="scripted/demo")
        Sandbox.objects.create(session=session, provider="local")
    assert list_queries() == few


def test_it_answers_404_when_artifact_bytes_are_gone(owner, session, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    artifact = store_artifact(session.pk, "log", "run.log", "hello")
    artifact.file.storage.delete(artifact.file.name)
    response = client_for(owner).get(f"/api/v1/artifacts/{artifact.pk}/download")
    assert response.status_code == 404
    assert "missing" in response.json()["detail"]


def test_it_treats_absurd_ids_as_not_found(owner, session, repository, django_capture_on_commit_callbacks):
    client = client_for(owner)
    assert client.get(f"{SESSIONS}/{'9' * 30}").status_code == 404
    assert client.get(f"{SESSIONS}?repository={'9' * 30}").status_code == 400
    response, body = start(
        client,
        {"repository": int("9" * 30), "prompt": "Go", "model": "scripted/demo"},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400
    assert list(body["errors"]) == ["repository"]

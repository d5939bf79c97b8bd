"""The operator console: every model's pages render, and the actions go through the model methods."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from django_q.models import OrmQ

from sandboxes.models import Sandbox
from sessions.artifacts import store_artifact
from sessions.events import emit
from sessions.models import (
    APIToken,
    Artifact,
    Environment,
    EnvironmentSecret,
    Event,
    LLMCall,
    Membership,
    Message,
    Repository,
    Run,
    Session,
    SessionStatus,
    Team,
    start_session,
)


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def console(superuser) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


@pytest.fixture
def session(team, owner, repository) -> Session:
    return start_session(
        team=team, repository=repository, prompt="Fix it", model="scripted/demo", created_by=owner
    )


@pytest.fixture
def everything(team, owner, repository, session) -> dict[type, object]:
    run = session.runs.get()
    emit(session.pk, "progress", {"message": "working"}, run_id=run.pk)
    token, _ = APIToken.issue(owner, name="ci")
    artifact = store_artifact(session.pk, "log", "run.log", "hello")
    environment = Environment.objects.create(team=team, name="python")
    environment.change_secrets({"API_TOKEN": {"value": "never-shown-1234"}})
    return {
        Team: team,
        Membership: Membership.objects.get(user=owner),
        Repository: repository,
        Environment: environment,
        EnvironmentSecret: environment.secrets.get(),
        Session: session,
        Message: session.messages.get(),
        Run: run,
        Event: session.events.order_by("seq").first(),
        Artifact: artifact,
        LLMCall: LLMCall.objects.create(session=session, run=run, provider="scripted", model="demo"),
        APIToken: token,
        Sandbox: Sandbox.objects.create(
            session=session, provider="local", isolated=False, isolation_note="no bwrap"
        ),
    }


def admin_url(model: type, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def test_it_registers_every_model():
    from django.apps import apps

    for app_label in ("agent_sessions", "sandboxes", "webhooks"):
        for model in apps.get_app_config(app_label).get_models():
            assert admin.site.is_registered(model), model


def test_it_renders_every_changelist_and_change_page(console, everything):
    for model, obj in everything.items():
        changelist = console.get(admin_url(model, "changelist"))
        assert changelist.status_code == 200, model
        change = console.get(admin_url(model, "change", obj.pk))
        assert change.status_code == 200, model
        assert b"never-shown-1234" not in changelist.content + change.content, model


def test_it_searches_and_filters_changelists(console, everything):
    for model in everything:
        response = console.get(admin_url(model, "changelist") + "?q=x")
        assert response.status_code == 200, model
    assert console.get(admin_url(Session, "changelist") + "?status__exact=queued").status_code == 200


def test_it_shows_session_events_read_only_in_order(console, session):
    for i in range(3):
        emit(session.pk, "progress", {"message": f"step {i}"})
    html = console.get(admin_url(Session, "change", session.pk)).content.decode()
    assert html.index("step 0") < html.index("step 1") < html.index("step 2")
    assert 'name="events-0-type"' not in html  # shown, not editable


def test_it_never_shows_a_token_hash(console, owner):
    token, secret = APIToken.issue(owner)
    for url in (admin_url(APIToken, "changelist"), admin_url(APIToken, "change", token.pk)):
        html = console.get(url).content.decode()
        assert token.key_hash not in html
        assert secret not in html
    assert console.get(admin_url(APIToken, "add")).status_code == 403


def test_it_cancels_selected_sessions(console, session, team, repository):
    done = start_session(team=team, repository=repository, prompt="Other", model="scripted/demo")
    done.cancel()
    response = console.post(
        admin_url(Session, "changelist"),
        {"action": "cancel_sessions", "_selected_action": [session.pk, done.pk]},
        follow=True,
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert "Cancelled 1 session(s)." in text
    assert "1 session(s) were already cancelled or archived." in text
    session.refresh_from_db()
    assert session.status == SessionStatus.CANCELLED
    assert session.runs.get().status == Run.Status.CANCELLED


def test_it_retries_selected_sessions(console, session, django_capture_on_commit_callbacks):
    session.cancel()
    queued = OrmQ.objects.count()
    with django_capture_on_commit_callbacks(execute=False):
        response = console.post(
            admin_url(Session, "changelist"),
            {"action": "retry_sessions", "_selected_action": [session.pk]},
            follow=True,
        )
    assert "Queued a new run for 1 session(s)." in response.content.decode()
    assert session.runs.filter(status=Run.Status.QUEUED).count() == 1
    assert OrmQ.objects.count() == queued + 1  # the run's task, in the same transaction
    session.refresh_from_db()
    assert session.status == SessionStatus.QUEUED

    again = console.post(
        admin_url(Session, "changelist"),
        {"action": "retry_sessions", "_selected_action": [session.pk]},
        follow=True,
    )
    assert "still have an active run" in again.content.decode()
    assert session.runs.count() == 2

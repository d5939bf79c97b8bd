"""The sandbox reaper against real sandboxes: local directories always, docker containers when an engine answers."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule

from sandboxes.base import SandboxSpec
from sandboxes.models import Sandbox
from sandboxes.providers.local import LocalProvider
from sandboxes.reaper import ORPHAN_GRACE, destroy_sandbox, reap
from sandboxes.tasks import reap_sandboxes
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Environment, Run, Session, start_session
from sessions.runner import checkout_dir, execute

LATER = timedelta(hours=2)


@pytest.fixture
def reaper_settings(settings, tmp_path):
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "none"
    settings.DATA_DIR = tmp_path / "data"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.SANDBOX_IDLE_TTL = 1800
    settings.SANDBOX_PROVIDER = "local"
    return settings


def new_session(team, owner, repository, *, environment=None, active: bool = False) -> Session:
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    if environment is not None:
        Session.objects.filter(pk=session.pk).update(environment=environment)
    if not active:
        session.runs.update(status=Run.Status.COMPLETED, finished=timezone.now())
    return session


def live_sandbox(session: Session, *, idle_for: timedelta) -> Sandbox:
    handle = LocalProvider().create(SandboxSpec(session_id=session.pk))
    handle.write_file("work.txt", b"state")
    return Sandbox.objects.create(
        session=session,
        provider="local",
        external_id=handle.id,
        status=Sandbox.Status.READY,
        last_used=timezone.now() - idle_for,
    )


def exists(sandbox: Sandbox) -> bool:
    return (LocalProvider().root / sandbox.external_id).exists()


def test_it_destroys_sandboxes_idle_past_their_ttl(reaper_settings, team, owner, repository):
    short = Environment.objects.create(team=team, name="short", idle_ttl_seconds=300)
    expired = live_sandbox(
        new_session(team, owner, repository, environment=short), idle_for=timedelta(minutes=10)
    )
    fresh = live_sandbox(
        new_session(team, owner, repository, environment=short), idle_for=timedelta(minutes=1)
    )
    default_ttl = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(minutes=10))

    report = reap()

    assert report.idle == [expired.external_id]
    expired.refresh_from_db()
    assert expired.status == Sandbox.Status.DESTROYED and expired.destroyed is not None
    assert not exists(expired)
    for kept in (fresh, default_ttl):
        kept.refresh_from_db()
        assert kept.status == Sandbox.Status.READY and exists(kept)


def test_it_uses_the_deployment_default_without_an_environment_ttl(reaper_settings, team, owner, repository):
    reaper_settings.SANDBOX_IDLE_TTL = 60
    no_ttl = Environment.objects.create(team=team, name="no-ttl")
    with_env = live_sandbox(
        new_session(team, owner, repository, environment=no_ttl), idle_for=timedelta(minutes=2)
    )
    without = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(minutes=2))

    assert sorted(reap().idle) == sorted([with_env.external_id, without.external_id])
    assert not exists(with_env) and not exists(without)


def test_it_keeps_an_idle_sandbox_whose_session_has_an_active_run(reaper_settings, team, owner, repository):
    sandbox = live_sandbox(new_session(team, owner, repository, active=True), idle_for=timedelta(days=1))

    assert reap().idle == []
    sandbox.refresh_from_db()
    assert sandbox.status == Sandbox.Status.READY and exists(sandbox)
    assert destroy_sandbox(sandbox, "test") is False


def test_it_does_not_destroy_a_sandbox_used_since_it_looked(reaper_settings, team, owner, repository):
    sandbox = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(days=1))
    stale = sandbox.last_used
    Sandbox.objects.filter(pk=sandbox.pk).update(last_used=timezone.now())

    assert destroy_sandbox(sandbox, "test", expect_last_used=stale) is False
    assert exists(sandbox)


def test_it_destroys_expired_sandboxes_however_recently_used(reaper_settings, team, owner, repository):
    reaper_settings.SANDBOX_MAX_AGE = 3600
    old = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(seconds=5))
    Sandbox.objects.filter(pk=old.pk).update(created=timezone.now() - timedelta(hours=2))
    archived_session = new_session(team, owner, repository)
    Session.objects.filter(pk=archived_session.pk).update(status="archived")
    archived = live_sandbox(archived_session, idle_for=timedelta(seconds=5))
    young = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(seconds=5))

    report = reap()

    assert sorted(report.expired) == sorted([old.external_id, archived.external_id])
    assert report.idle == []
    for gone in (old, archived):
        gone.refresh_from_db()
        assert gone.status == Sandbox.Status.DESTROYED and not exists(gone)
    young.refresh_from_db()
    assert young.status == Sandbox.Status.READY and exists(young)


def test_it_marks_sandboxes_stuck_in_creating_as_failed(reaper_settings, team, owner, repository):
    dead_worker = Sandbox.objects.create(
        session=new_session(team, owner, repository), provider="local", status=Sandbox.Status.CREATING
    )
    Sandbox.objects.filter(pk=dead_worker.pk).update(created=timezone.now() - ORPHAN_GRACE * 2)
    creating_now = Sandbox.objects.create(
        session=new_session(team, owner, repository), provider="local", status=Sandbox.Status.CREATING
    )
    busy = Sandbox.objects.create(
        session=new_session(team, owner, repository, active=True),
        provider="local",
        status=Sandbox.Status.CREATING,
    )
    Sandbox.objects.filter(pk=busy.pk).update(created=timezone.now() - ORPHAN_GRACE * 2)

    report = reap()

    assert report.stuck == [str(dead_worker.pk)]
    dead_worker.refresh_from_db()
    assert dead_worker.status == Sandbox.Status.FAILED and "stopped while creating" in dead_worker.error
    for kept in (creating_now, busy):
        kept.refresh_from_db()
        assert kept.status == Sandbox.Status.CREATING


def test_it_is_idempotent(reaper_settings, team, owner, repository):
    sandbox = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(days=1))

    assert destroy_sandbox(sandbox, "test") is True
    assert destroy_sandbox(sandbox, "test") is False
    LocalProvider().destroy(sandbox.external_id)
    assert reap(timezone.now() + LATER).idle == []


def test_it_destroys_local_orphans_after_a_grace_period(reaper_settings, team, owner, repository):
    session = new_session(team, owner, repository)
    provider = LocalProvider()
    orphan = provider.create(SandboxSpec(session_id=session.pk))  # a worker died before saving the row
    dead_row = live_sandbox(session, idle_for=timedelta(0))
    Sandbox.objects.filter(pk=dead_row.pk).update(status=Sandbox.Status.DESTROYED)  # destroy had failed
    kept = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(0))
    stranger = provider.root / "not-a-sandbox"
    stranger.mkdir()

    assert reap().orphans == []  # too young: it may be a sandbox being created right now
    report = reap(timezone.now() + ORPHAN_GRACE + timedelta(minutes=1))

    assert sorted(report.orphans) == sorted([orphan.id, dead_row.external_id])
    assert not (provider.root / orphan.id).exists() and not exists(dead_row)
    assert exists(kept) and stranger.is_dir()


def test_it_removes_checkouts_of_sessions_without_a_live_sandbox(reaper_settings, team, owner, repository):
    gone = new_session(team, owner, repository)
    live = new_session(team, owner, repository)
    live_sandbox(live, idle_for=timedelta(0))
    running = new_session(team, owner, repository, active=True)
    for session in (gone, live, running):
        (checkout_dir(session.pk) / ".git").mkdir(parents=True)
    (checkout_dir(999999)).mkdir()  # its session was deleted
    partial = checkout_dir(gone.pk).with_name(f"session-{gone.pk}.partial")  # a worker killed writing it
    (partial / ".git").mkdir(parents=True)

    report = reap()

    assert sorted(report.checkouts) == sorted([f"session-{gone.pk}", "session-999999"])
    assert not checkout_dir(gone.pk).exists() and not partial.exists()
    assert checkout_dir(live.pk).is_dir() and checkout_dir(running.pk).is_dir()


def test_it_removes_repository_templates_no_checkout_borrows(reaper_settings, team, owner, repository):
    from sessions.repocache import cache_root

    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    with start_in_thread({"responses": [{"content": "done"}]}) as fake:
        reaper_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
    assert session.runs.get().status == Run.Status.COMPLETED
    (template,) = [p for p in cache_root().iterdir() if not p.name.startswith(".")]

    assert reap().templates == []  # used recently
    old = (timezone.now() - LATER).timestamp()
    os.utime(template, (old, old))
    assert reap().templates == []  # unused for long, but the live sandbox's checkout borrows it
    assert template.is_dir()
    session.sandboxes.update(status=Sandbox.Status.DESTROYED)
    report = reap()
    assert report.checkouts == [f"session-{session.pk}"] and report.templates == [template.name]
    assert not template.exists()


def test_it_is_scheduled_by_a_migration(db):
    schedule = Schedule.objects.get(func="sandboxes.tasks.reap_sandboxes")
    assert schedule.schedule_type == Schedule.MINUTES and schedule.minutes == 5 and schedule.repeats == -1


def test_the_task_reports_what_it_did(reaper_settings, team, owner, repository):
    live_sandbox(new_session(team, owner, repository), idle_for=timedelta(days=1))
    assert reap_sandboxes().startswith("destroyed 1 idle, 0 expired and 0 orphaned sandboxes")


def test_a_follow_up_after_reaping_gets_a_new_sandbox(reaper_settings, team, owner, repository):
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    with start_in_thread({"responses": [{"content": "one"}, {"content": "two"}]}) as fake:
        reaper_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
        first = session.sandboxes.get()
        assert reap(timezone.now() + LATER).idle == [first.external_id]
        assert not checkout_dir(session.pk).exists()

        session.add_message("again")
        follow_up = session.runs.get(status=Run.Status.QUEUED)
        execute(follow_up.pk)

    follow_up.refresh_from_db()
    assert follow_up.status == Run.Status.COMPLETED, follow_up.error
    second = session.sandboxes.get(status=Sandbox.Status.READY)
    assert second.pk != first.pk and exists(second)


def test_the_admin_destroys_selected_sandboxes(reaper_settings, team, owner, repository, django_user_model):
    admin_user = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    idle = live_sandbox(new_session(team, owner, repository), idle_for=timedelta(0))
    busy = live_sandbox(new_session(team, owner, repository, active=True), idle_for=timedelta(0))
    client = Client()
    client.force_login(admin_user)

    response = client.post(
        reverse("admin:sandboxes_sandbox_changelist"),
        {"action": "destroy_sandboxes", "_selected_action": [idle.pk, busy.pk]},
        follow=True,
    )

    assert response.status_code == 200
    text = response.content.decode()
    assert "Destroyed 1 sandboxes." in text and "Skipped 1:" in text
    idle.refresh_from_db()
    busy.refresh_from_db()
    assert idle.status == Sandbox.Status.DESTROYED and not exists(idle)
    assert busy.status == Sandbox.Status.READY and exists(busy)


# --- docker -------------------------------------------------------------------------------------


@pytest.fixture
def docker_settings(reaper_settings):
    from tests.test_sandbox_docker import DEPLOYMENT, IMAGE, require_engine

    require_engine()
    reaper_settings.SANDBOX_PROVIDER = "docker"
    reaper_settings.DOCKER_IMAGE = IMAGE
    reaper_settings.DOCKER_DEPLOYMENT = f"{DEPLOYMENT}-reaper"
    return reaper_settings


def test_it_reaps_idle_and_orphaned_docker_sandboxes(docker_settings, team, owner, repository):
    from sandboxes.providers.docker import DockerProvider

    provider = DockerProvider()
    session = new_session(team, owner, repository)
    idle = provider.create(SandboxSpec(session_id=session.pk))
    orphan = provider.create(SandboxSpec(session_id=session.pk))
    kept = provider.create(SandboxSpec(session_id=session.pk))
    try:
        Sandbox.objects.create(
            session=session,
            provider="docker",
            external_id=idle.id,
            status=Sandbox.Status.READY,
            last_used=timezone.now() - timedelta(days=1),
        )
        Sandbox.objects.create(
            session=session, provider="docker", external_id=kept.id, status=Sandbox.Status.READY
        )

        report = reap(timezone.now() + ORPHAN_GRACE + timedelta(minutes=1))

        assert report.idle == [idle.id] and report.orphans == [orphan.id], report
        names = {c["id"] for c in provider.managed_sandboxes()}
        assert names == {kept.id}
    finally:
        for handle in (idle, orphan, kept):
            provider.destroy(handle.id)

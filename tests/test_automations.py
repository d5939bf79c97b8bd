"""Automations and scheduled follow-ups with a frozen clock advanced by the test (issue 13, item 7)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django_q.models import Schedule

from sessions.automations import Automation, AutomationFiring, ScheduledMessage, next_occurrence, run_due
from sessions.models import Repository, Run, Session, SessionStatus

T0 = datetime(2026, 3, 2, 9, 0, 20, tzinfo=UTC)  # a clock the test owns: 09:00:20 UTC


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.DEFAULT_MODEL = ""


@pytest.fixture
def repository(team, sample_repo):
    return Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")


@pytest.fixture
def every_minute(team, owner, repository) -> Automation:
    automation = Automation(team=team, name="nightly", cron="* * * * *", prompt="Check the build",
                            repository=repository, model="scripted/demo", created_by=owner)  # fmt: skip
    automation.schedule(now=T0)
    automation.save()
    return automation


def finish_all_runs() -> None:
    for run in Run.objects.filter(status__in=Run.ACTIVE):
        assert run.claim("test") and run.finish(Run.Status.COMPLETED)


def scheduled_sessions() -> list[Session]:
    return list(Session.objects.filter(source="schedule").order_by("pk"))


@pytest.mark.django_db
def test_it_starts_one_session_per_tick_and_none_between_ticks(every_minute, owner):
    assert every_minute.next_fire_at == datetime(2026, 3, 2, 9, 1, tzinfo=UTC)
    assert run_due(now=T0) == {"started": 0, "skipped": 0, "followups": 0}  # not due yet

    tick = T0 + timedelta(minutes=1)  # 09:01:20
    assert run_due(now=tick)["started"] == 1
    assert run_due(now=tick + timedelta(seconds=30)) == {"started": 0, "skipped": 0, "followups": 0}
    session = scheduled_sessions()[0]
    assert (session.source, session.created_by, session.model) == ("schedule", owner, "scripted/demo")
    assert session.messages.get().content == "Check the build"
    assert session.external_ref == {"automation": every_minute.pk, "due_at": "2026-03-02T09:01:00+00:00"}
    finish_all_runs()

    assert run_due(now=tick + timedelta(minutes=1))["started"] == 1
    assert len(scheduled_sessions()) == 2
    every_minute.refresh_from_db()
    assert every_minute.next_fire_at == datetime(2026, 3, 2, 9, 3, tzinfo=UTC)
    assert every_minute.last_session == scheduled_sessions()[-1]


@pytest.mark.django_db
def test_it_skips_an_occurrence_while_the_previous_session_is_still_running_and_says_why(every_minute):
    run_due(now=T0 + timedelta(minutes=1))
    first = scheduled_sessions()[0]
    assert first.status == SessionStatus.QUEUED
    assert run_due(now=T0 + timedelta(minutes=2)) == {"started": 0, "skipped": 1, "followups": 0}
    skipped = AutomationFiring.objects.get(automation=every_minute, session=None)
    assert skipped.skipped == f"skipped: session {first.pk} of the previous run is still queued"
    assert skipped.due_at == datetime(2026, 3, 2, 9, 2, tzinfo=UTC)
    assert len(scheduled_sessions()) == 1
    finish_all_runs()
    assert run_due(now=T0 + timedelta(minutes=3))["started"] == 1


@pytest.mark.django_db
def test_it_runs_missed_occurrences_once_after_downtime(every_minute):
    back = T0 + timedelta(hours=3, minutes=10)  # every worker was down for three hours
    assert run_due(now=back) == {"started": 1, "skipped": 0, "followups": 0}
    assert run_due(now=back) == {"started": 0, "skipped": 0, "followups": 0}
    assert AutomationFiring.objects.count() == 1
    every_minute.refresh_from_db()
    assert every_minute.next_fire_at == datetime(2026, 3, 2, 12, 11, tzinfo=UTC)  # the next one after now


@pytest.mark.django_db
def test_it_fires_nothing_while_paused_and_resumes_from_the_next_occurrence(every_minute):
    assert every_minute.pause() and not every_minute.pause()
    assert run_due(now=T0 + timedelta(minutes=30))["started"] == 0
    assert every_minute.resume(now=T0 + timedelta(minutes=30))
    assert every_minute.next_fire_at == datetime(2026, 3, 2, 9, 31, tzinfo=UTC)  # nothing made up
    assert run_due(now=T0 + timedelta(minutes=31))["started"] == 1


@pytest.mark.django_db
def test_it_fires_an_occurrence_once_even_when_two_ticks_race_for_it(every_minute):
    tick = T0 + timedelta(minutes=1)
    stale = Automation.objects.get(pk=every_minute.pk)  # a second worker read the same row
    assert every_minute.fire(tick) is not None
    assert stale.fire(tick) is None
    assert len(scheduled_sessions()) == 1


def test_it_reads_the_cron_expression_in_the_automations_time_zone():
    after = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    # 09:00 in Paris is 08:00 UTC before the switch to summer time, 07:00 UTC after it.
    assert next_occurrence("0 9 * * *", "Europe/Paris", after) == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)
    assert next_occurrence("0 9 * * *", "UTC", after) == datetime(2026, 3, 29, 9, 0, tzinfo=UTC)


@pytest.mark.django_db
def test_it_sends_a_scheduled_follow_up_once_when_it_is_due(every_minute, owner):
    run_due(now=T0 + timedelta(minutes=1))
    session = scheduled_sessions()[0]
    finish_all_runs()
    later = ScheduledMessage.objects.create(session=session, content="Re-check CI", created_by=owner,
                                            due_at=T0 + timedelta(hours=2))  # fmt: skip
    every_minute.pause()
    assert run_due(now=T0 + timedelta(hours=1))["followups"] == 0
    assert run_due(now=T0 + timedelta(hours=2, seconds=5))["followups"] == 1
    assert run_due(now=T0 + timedelta(hours=2, seconds=65))["followups"] == 0
    later.refresh_from_db()
    assert later.status == "sent" and later.message.content == "Re-check CI"
    assert session.runs.filter(status="queued").count() == 1  # the follow-up started a run

    cancelled = ScheduledMessage.objects.create(session=session, content="never", due_at=T0)
    assert cancelled.cancel() and not cancelled.cancel()
    assert run_due(now=T0 + timedelta(hours=3))["followups"] == 0


@pytest.mark.django_db
def test_it_is_driven_by_a_minute_schedule_of_the_worker(every_minute):
    schedule = Schedule.objects.get(func="sessions.tasks.run_automations")
    assert (schedule.schedule_type, schedule.minutes, schedule.repeats) == ("I", 1, -1)


@pytest.mark.django_db
def test_it_manages_automations_through_the_api(owner, viewer, outsider, repository, other_team):
    from tests.conftest import client_for

    api = client_for(owner)
    body = {"name": "weekday check", "cron": "0 9 * * 1-5", "timezone": "Europe/Paris",
            "prompt": "Check the build", "repository": repository.pk, "model": "scripted/demo"}  # fmt: skip
    created = api.post("/api/v1/automations", body, format="json")
    assert created.status_code == 201, created.content
    data = created.json()
    assert data["paused"] is False and data["next_fire_at"] and data["created_by"] == owner.username
    url = f"/api/v1/automations/{data['id']}"

    for field, value in (("cron", "every day"), ("timezone", "Mars/Olympus"), ("prompt", " "),
                         ("model", "nope/x")):  # fmt: skip
        bad = api.post("/api/v1/automations", {**body, "name": f"bad {field}", field: value}, format="json")
        assert bad.status_code == 400 and field in bad.json()["errors"], (field, bad.content)
    theirs = Repository.objects.create(team=other_team, name="theirs", url="/srv/theirs", provider="local")
    bad = api.post("/api/v1/automations", {**body, "name": "x", "repository": theirs.pk}, format="json")
    assert bad.status_code == 400 and "repository" in bad.json()["errors"]

    assert api.post(f"{url}/pause").json()["next_fire_at"] is None
    assert api.post(f"{url}/pause").status_code == 409
    assert api.post(f"{url}/resume").json()["paused"] is False
    edited = api.patch(url, {"cron": "30 7 * * *", "timezone": "UTC"}, format="json").json()
    assert edited["next_fire_at"].endswith("07:30:00Z")
    assert api.get(f"{url}/firings").json()["results"] == []

    assert client_for(viewer).get(url).status_code == 200
    assert client_for(viewer).post(f"{url}/pause").status_code == 403
    assert client_for(viewer).patch(url, {"cron": "* * * * *"}, format="json").status_code == 403
    assert client_for(outsider).get(url).status_code == 404
    assert api.delete(url).status_code == 204 and not Automation.objects.exists()


@pytest.mark.django_db
def test_it_schedules_and_cancels_follow_ups_through_the_api(every_minute, owner, viewer, outsider):
    from tests.conftest import client_for

    run_due(now=T0 + timedelta(minutes=1))
    session = scheduled_sessions()[0]
    url = f"/api/v1/sessions/{session.pk}/scheduled-messages"
    api = client_for(owner)
    created = api.post(url, {"content": "Re-check CI", "delay_seconds": 7200}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["status"] == "pending"
    assert api.post(url, {"content": "x"}, format="json").status_code == 400
    assert api.post(url, {"content": "x", "due_at": "2020-01-01T00:00:00Z"}, format="json").status_code == 400
    assert (
        client_for(viewer).post(url, {"content": "x", "delay_seconds": 60}, format="json").status_code == 403
    )
    assert client_for(outsider).get(url).status_code == 404
    assert [m["content"] for m in client_for(viewer).get(url).json()["results"]] == ["Re-check CI"]
    one = f"{url}/{created.json()['id']}"
    assert client_for(viewer).delete(one).status_code == 403
    assert api.delete(one).status_code == 204 and api.delete(one).status_code == 409


@pytest.mark.django_db
def test_it_creates_pauses_and_lists_automations_on_the_dashboard(client, owner, viewer, repository):
    client.force_login(owner)
    page = client.get("/automations")
    assert page.status_code == 200 and 'id="automation-form"' in page.content.decode()
    bad = client.post("/automations", {"team": repository.team_id, "name": "x", "cron": "nope",
                                       "timezone": "UTC", "prompt": "p", "repository": repository.pk})  # fmt: skip
    assert bad.status_code == 400 and "cron:" in bad.content.decode()
    made = client.post("/automations", {"team": repository.team_id, "name": "nightly", "cron": "0 2 * * *",
                                        "timezone": "Europe/Paris", "prompt": "Check the build",
                                        "repository": repository.pk, "model": "scripted/demo"})  # fmt: skip
    assert made.status_code == 302
    automation = Automation.objects.get(name="nightly")
    assert automation.created_by == owner and automation.next_fire_at is not None
    client.post(f"/automations/{automation.pk}/toggle", {"action": "pause"})
    automation.refresh_from_db()
    assert automation.paused
    assert "Resume" in client.get("/automations").content.decode()
    client.force_login(viewer)
    assert client.post(f"/automations/{automation.pk}/toggle", {"action": "resume"}).status_code == 403
    assert "Pause" not in client.get("/automations").content.decode().split("automation-table")[1]


@pytest.mark.django_db
def test_it_schedules_a_follow_up_from_the_session_page(every_minute, client, owner):
    run_due(now=T0 + timedelta(minutes=1))
    session = scheduled_sessions()[0]
    client.force_login(owner)
    client.post(f"/sessions/{session.pk}/scheduled", {"content": "Re-check CI", "minutes": "120"})
    scheduled = ScheduledMessage.objects.get(session=session)
    assert (
        scheduled.status == "pending"
        and "Re-check CI" in client.get(f"/sessions/{session.pk}").content.decode()
    )
    client.post(f"/sessions/{session.pk}/scheduled", {"cancel": scheduled.pk})
    scheduled.refresh_from_db()
    assert scheduled.status == "cancelled"


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_it_runs_missed_occurrences_once_through_a_real_workers_scheduler(settings, tmp_path, team, owner,
                                                                          repository):  # fmt: skip
    """Every worker was down for ten minutes of an every-minute automation: the worker's scheduler
    queues the automations task, which starts one session, and the scripted model runs it."""
    from django.utils import timezone

    from sessions.agent.fake_llm import start_in_thread
    from tests.live import child_env, wait_for, worker_process

    now = timezone.now()
    Schedule.objects.update_or_create(
        func="sessions.tasks.run_automations",
        defaults={"name": "deputies: automations and scheduled follow-ups", "schedule_type": "I", "minutes": 1,
                  "repeats": -1, "next_run": now - timedelta(minutes=10)},
    )  # fmt: skip
    automation = Automation(team=team, name="every minute", cron="* * * * *", prompt="Check the build",
                            repository=repository, model="scripted/demo", created_by=owner)  # fmt: skip
    automation.schedule(now=now - timedelta(minutes=10))
    automation.save()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with start_in_thread({"responses": [{"content": "The build is green."}]}) as fake:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
            DEPUTIES_SANDBOX_ISOLATION="none",
        )
        with worker_process(env):
            session = wait_for(
                lambda: Session.objects.filter(source="schedule", status="completed").first(),
                timeout=60,
                what="the scheduled session to complete",
            )
    assert session.summary == "The build is green."
    assert Session.objects.filter(source="schedule").count() == 1  # ten missed minutes, one session
    automation.refresh_from_db()
    assert automation.next_fire_at > now and automation.last_session == session
    assert AutomationFiring.objects.filter(automation=automation).count() == 1


@pytest.mark.django_db
def test_it_shows_and_pauses_automations_in_the_admin(every_minute, owner, django_user_model, client):
    from django.urls import reverse

    run_due(now=T0 + timedelta(minutes=1))
    run_due(now=T0 + timedelta(minutes=2))  # skipped: the first is still queued
    session = scheduled_sessions()[0]
    scheduled = ScheduledMessage.objects.create(
        session=session, content="later", due_at=T0 + timedelta(hours=1)
    )
    admin_user = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin_user)
    firing = AutomationFiring.objects.filter(session=None).get()
    for model, obj in ((Automation, every_minute), (AutomationFiring, firing), (ScheduledMessage, scheduled)):
        name = f"admin:agent_sessions_{model._meta.model_name}"
        assert client.get(reverse(f"{name}_changelist")).status_code == 200, model
        change = client.get(reverse(f"{name}_change", args=[obj.pk]))
        assert change.status_code == 200, model
    assert (
        "still queued"
        in client.get(
            reverse("admin:agent_sessions_automation_change", args=[every_minute.pk])
        ).content.decode()
    )
    client.post(reverse("admin:agent_sessions_automation_changelist"),
                {"action": "pause_automations", "_selected_action": [every_minute.pk]})  # fmt: skip
    every_minute.refresh_from_db()
    assert every_minute.paused and every_minute.next_fire_at is None
    bad = client.post(reverse("admin:agent_sessions_automation_change", args=[every_minute.pk]), {
        "team": every_minute.team_id, "name": "nightly", "cron": "61 * * * *", "timezone": "UTC",
        "prompt": "p", "repository": every_minute.repository_id, "model": ""})  # fmt: skip
    assert bad.status_code == 200 and "not a valid cron expression" in bad.content.decode()


@pytest.mark.django_db
def test_a_firing_starts_its_session_with_the_automations_profile(every_minute):
    from sessions.models import AgentProfile

    profile = AgentProfile.objects.create(team=every_minute.team, name="reviewer")
    every_minute.profile = profile
    every_minute.save()
    assert run_due(now=T0 + timedelta(minutes=1))["started"] == 1
    assert scheduled_sessions()[0].profile == profile


@pytest.mark.django_db
def test_the_api_refuses_a_profile_of_another_team(owner, repository, other_team):
    from sessions.models import AgentProfile
    from tests.conftest import client_for

    api = client_for(owner)
    theirs = AgentProfile.objects.create(team=other_team, name="theirs")
    body = {"name": "weekday check", "cron": "0 9 * * 1-5", "prompt": "Check the build",
            "repository": repository.pk, "model": "scripted/demo", "profile": theirs.pk}  # fmt: skip
    bad = api.post("/api/v1/automations", body, format="json")
    assert bad.status_code == 400 and "profile" in bad.json()["errors"], bad.content
    ours = AgentProfile.objects.create(team=repository.team, name="ours")
    created = api.post("/api/v1/automations", {**body, "profile": ours.pk}, format="json")
    assert created.status_code == 201 and created.json()["profile"] == ours.pk, created.content


@pytest.mark.django_db
def test_the_dashboard_lists_each_automations_profile_or_the_default_it_gets(client, owner, every_minute):
    from sessions.models import AgentProfile, Environment

    def profile_cells() -> list[str]:
        page = client.get("/automations").content.decode().split('id="automation-table"')[1]
        return [cell.split("</td>")[0] for cell in page.split('<td data-label="Profile">')[1:]]

    client.force_login(owner)
    team = every_minute.team
    assert '<th scope="col">Profile</th>' in client.get("/automations").content.decode()
    assert profile_cells() == ['<span class="muted">environment default</span>']
    team.default_profile = AgentProfile.objects.create(team=team, name="careful")
    team.save()
    assert profile_cells() == ['<span class="muted">environment default (careful)</span>']
    every_minute.environment = Environment.objects.create(
        team=team, name="ci", default_profile=AgentProfile.objects.create(team=team, name="fast")
    )
    every_minute.save()
    assert profile_cells() == ['<span class="muted">environment default (fast)</span>']
    every_minute.profile = AgentProfile.objects.create(team=team, name="reviewer")
    every_minute.save()
    assert profile_cells() == ["reviewer"]


@pytest.mark.django_db
def test_a_firing_picks_its_model_in_the_order_a_session_started_through_the_api_does(
    every_minute, owner, settings
):
    """Own model, then the profile's (its own or the default one it gets), the environment's,
    then DEPUTIES_DEFAULT_MODEL: both go through models.session_model."""
    from sessions.models import AgentProfile, Environment
    from tests.conftest import client_for

    team = every_minute.team
    settings.LLM_PROVIDERS = {
        name: {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
        for name in ("scripted", "deploy", "env", "team", "own")
    }
    settings.DEFAULT_MODEL = "deploy/m"
    every_minute.model = ""
    every_minute.environment = Environment.objects.create(team=team, name="ci", default_model="env/m")
    every_minute.save()
    api = client_for(owner)
    body = {"prompt": "Check the build", "repository": every_minute.repository_id,
            "environment": every_minute.environment_id}  # fmt: skip

    def models() -> tuple[str, str]:
        via_api = api.post("/api/v1/sessions", body, format="json")
        assert via_api.status_code == 201, via_api.content
        return every_minute.resolved_model(), via_api.json()["model"]

    assert models() == ("env/m", "env/m")
    team.default_profile = AgentProfile.objects.create(team=team, name="careful", model="team/m")
    team.save()
    assert models() == ("team/m", "team/m")  # the default profile it gets
    every_minute.profile = AgentProfile.objects.create(team=team, name="own", model="own/m")
    body["profile"] = every_minute.profile.pk
    assert models() == ("own/m", "own/m")
    every_minute.model = body["model"] = "scripted/demo"
    assert models() == ("scripted/demo", "scripted/demo")
    # Nothing but the deployment's default left.
    every_minute.model, every_minute.profile = "", None
    del body["model"], body["profile"]
    every_minute.environment.default_model = ""
    every_minute.environment.save()
    team.default_profile.model = ""
    team.default_profile.save()
    assert models() == ("deploy/m", "deploy/m")

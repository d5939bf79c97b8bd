"""Per-team concurrency limits: extra runs wait queued, in order, and start when a slot frees."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django_q.models import OrmQ
from django_q.signing import SignedPackage
from rest_framework.test import APIClient

from sessions.agent.fake_llm import start_in_thread
from sessions.limits import wake_all_waiting
from sessions.models import Repository, Run, Session, Team, start_session
from tests.live import wait_for, worker_process
from tests.test_worker_concurrency import finished, max_overlap, slow_script, worker_env


@pytest.fixture
def repository(team, sample_repo):
    return Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")


def start(team, repository, n: int = 1) -> list[Session]:
    return [
        start_session(team=team, repository=repository, prompt=f"task {i}", model="scripted/demo")
        for i in range(n)
    ]


def queued_task_runs() -> list[int]:
    return [SignedPackage.loads(q.payload)["args"][0] for q in OrmQ.objects.order_by("pk")]


def run_of(session: Session) -> Run:
    return Run.objects.select_related("session__team").get(session=session)


@pytest.mark.django_db(transaction=True)
def test_it_keeps_a_run_queued_while_its_team_is_at_its_limit_and_wakes_it_when_one_ends(team, repository):
    team.max_concurrent_runs = 1
    team.save()
    first, second = start(team, repository, 2)
    assert run_of(first).claim("w") is True
    waiting = run_of(second)
    assert waiting.claim("w") is False and waiting.waiting_for_team
    assert Run.objects.get(pk=waiting.pk).status == "queued"
    OrmQ.objects.all().delete()  # the tasks were delivered (and acknowledged)

    running = run_of(first)
    running.finish(Run.Status.COMPLETED)
    assert queued_task_runs() == [waiting.pk]  # queued again once the slot was free
    assert run_of(second).claim("w") is True


@pytest.mark.django_db(transaction=True)
def test_it_starts_waiting_runs_oldest_first(team, repository):
    team.max_concurrent_runs = 2
    team.save()
    a, b, c, d = (run_of(s) for s in start(team, repository, 4))
    assert a.claim("w") and b.claim("w")
    # d's task comes first, but c has waited longer: d may not take c's slot.
    a.finish(Run.Status.COMPLETED)
    assert run_of(d.session).claim("w") is False
    assert run_of(c.session).claim("w") is True


@pytest.mark.django_db(transaction=True)
def test_it_never_lets_two_workers_both_take_the_last_slot(team, repository):
    team.max_concurrent_runs = 3
    team.save()
    sessions = start(team, repository, 8)  # threads hold a pooled connection each (10 per process)
    barrier = threading.Barrier(len(sessions))
    results: list[bool] = []

    def claim(session: Session) -> None:
        try:
            run = run_of(session)
            barrier.wait(timeout=10)
            results.append(run.claim(f"w-{session.pk}"))
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results.count(True) == 3 and len(results) == 8
    assert Run.objects.filter(status="running").count() == 3
    # And the three are the oldest: the rest keep their order.
    assert sorted(Run.objects.filter(status="running").values_list("pk", flat=True)) == sorted(
        Run.objects.order_by("pk").values_list("pk", flat=True)[:3]
    )


@pytest.mark.django_db(transaction=True)
def test_it_shows_the_place_in_the_queue_in_the_api(settings, team, owner, repository, other_team):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    team.max_concurrent_runs = 1
    team.save()
    first, second, third = start(team, repository, 3)
    other_repo = Repository.objects.create(team=other_team, name="o", url=str(repository.url))
    unlimited = start(other_team, other_repo)[0]
    assert run_of(first).claim("w")
    client = APIClient()
    client.force_authenticate(owner)
    listed = {s["id"]: s["queue_position"] for s in client.get("/api/v1/sessions").json()["results"]}
    assert listed == {first.pk: None, second.pk: 1, third.pk: 2}
    assert client.get(f"/api/v1/sessions/{third.pk}").json()["queue_position"] == 2
    created = client.post(
        "/api/v1/sessions",
        {"repository": repository.pk, "prompt": "more", "model": "scripted/demo"},
        format="json",
    )
    assert created.status_code == 201 and created.json()["queue_position"] == 3
    assert unlimited.status == "queued"
    staff = type(owner).objects.create_user("staff", is_staff=True)
    client.force_authenticate(staff)
    assert client.get(f"/api/v1/sessions/{unlimited.pk}").json()["queue_position"] is None  # no limit


@pytest.mark.django_db(transaction=True)
def test_it_shows_the_place_in_the_queue_on_the_pages(client, team, owner, repository):
    team.max_concurrent_runs = 1
    team.save()
    first, second = start(team, repository, 2)
    assert run_of(first).claim("w")
    client.force_login(owner)
    assert "#1 in queue" in client.get("/").content.decode()
    page = client.get(f"/sessions/{second.pk}").content.decode()
    assert "position 1 in the team&#x27;s queue" in page or "position 1 in the team's queue" in page


@pytest.mark.django_db(transaction=True)
def test_it_frees_the_slot_of_a_cancelled_run(team, repository):
    team.max_concurrent_runs = 1
    team.save()
    first, second = start(team, repository, 2)
    assert run_of(first).claim("w")
    assert not run_of(second).claim("w")
    OrmQ.objects.all().delete()
    Session.objects.get(pk=first.pk).cancel()
    assert queued_task_runs() == [run_of(second).pk]


@pytest.mark.django_db(transaction=True)
def test_it_starts_every_waiting_run_when_the_limit_is_lifted_in_the_admin(admin_client, team, repository):
    team.max_concurrent_runs = 1
    team.save()
    first, second, third = start(team, repository, 3)
    assert run_of(first).claim("w")
    OrmQ.objects.all().delete()
    response = admin_client.post(
        f"/admin/agent_sessions/team/{team.pk}/change/",
        {
            "name": team.name,
            "slug": team.slug,
            "max_concurrent_runs": "0",
            "created_0": "2026-01-01",
            "created_1": "00:00:00",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    assert Team.objects.get(pk=team.pk).max_concurrent_runs == 0
    assert queued_task_runs() == [run_of(second).pk, run_of(third).pk]


@pytest.mark.django_db(transaction=True)
def test_it_wakes_forgotten_waiting_runs_from_the_schedule(team, repository):
    team.max_concurrent_runs = 2
    team.save()
    (only,) = start(team, repository, 1)
    OrmQ.objects.all().delete()  # its task was lost
    Run.objects.filter(session=only).update(created=Run.objects.get(session=only).created.replace(year=2020))
    assert wake_all_waiting() == [run_of(only).pk]
    assert queued_task_runs() == [run_of(only).pk]


@pytest.mark.django_db(transaction=True)
def test_it_never_runs_more_than_the_limit_on_a_real_worker(tmp_path, team, owner, sample_repo):
    team.max_concurrent_runs = 2
    team.save()
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    with start_in_thread(slow_script(2)) as fake:
        env = worker_env(tmp_path, fake)
        with worker_process(env):
            ids = [
                start_session(team=team, repository=repository, prompt=f"t{n}", model="scripted/slow").pk
                for n in range(5)
            ]
            wait_for(lambda: finished(ids), timeout=60, what="the five sessions")
    assert set(Session.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"completed"}
    assert max_overlap(ids) == 2  # from each run's start and end: never three at once
    started = list(Run.objects.filter(session_id__in=ids).order_by("started").values_list("pk", flat=True))
    # The first two take the two free slots at once (either may start first); the waiting ones
    # start oldest first: a run starts only when its team's running runs and older waiting ones
    # leave a slot, so two slots freed together may start the next two in either order, and the
    # newest never starts before both of those.
    ordered = sorted(started)
    assert set(started[:2]) == set(ordered[:2]) and set(started[2:4]) == set(ordered[2:4])
    assert started[4] == ordered[4]

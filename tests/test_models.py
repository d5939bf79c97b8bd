from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction
from django_q.models import OrmQ

from sessions.events import emit, emit_many
from sessions.models import Event, Run, Session, start_session


@pytest.fixture
def session(team, owner, repository, settings, django_capture_on_commit_callbacks) -> Session:
    return start_session(
        team=team, repository=repository, prompt="Fix the bug", model="scripted/demo", created_by=owner
    )


def test_it_numbers_events_without_gaps(session):
    emit_many(session.pk, [("progress", {"message": str(i)}) for i in range(5)])
    emit(session.pk, "progress", {"message": "last"})
    seqs = list(Event.objects.filter(session=session).values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert Session.objects.get(pk=session.pk).last_seq == len(seqs)


def test_it_rolls_back_the_sequence_with_the_event(session):
    before = Session.objects.get(pk=session.pk).last_seq
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            emit(session.pk, "progress", {"message": "lost"})
            raise RuntimeError("boom")
    assert Session.objects.get(pk=session.pk).last_seq == before
    emit(session.pk, "progress", {"message": "kept"})
    assert Event.objects.filter(session=session).order_by("-seq").first().seq == before + 1


def test_it_allows_only_one_active_run_per_session(session):
    assert session.runs.filter(status__in=Run.ACTIVE).count() == 1
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.create(session=session)


def test_it_lets_only_one_worker_claim_a_run(session):
    run = session.runs.get()
    assert run.claim("worker-a") is True
    duplicate = Run.objects.get(pk=run.pk)
    assert duplicate.claim("worker-b") is False
    assert Run.objects.get(pk=run.pk).lease_owner == "worker-a"


def test_it_queues_a_follow_up_behind_the_active_run(session, django_capture_on_commit_callbacks):
    run = session.runs.get()
    run.claim("w")
    session.add_message("and also this")
    assert session.runs.count() == 1
    with django_capture_on_commit_callbacks():
        run.finish(Run.Status.COMPLETED)
    assert session.runs.count() == 2
    assert session.runs.filter(status=Run.Status.QUEUED).count() == 1


def test_it_requeues_a_run_whose_worker_stopped_heartbeating(session, django_capture_on_commit_callbacks):
    from datetime import timedelta

    from django.utils import timezone

    run = session.runs.get()
    run.claim("lost-worker")
    Run.objects.filter(pk=run.pk).update(heartbeat=timezone.now() - timedelta(hours=1))
    cutoff = timezone.now() - timedelta(minutes=15)
    queued = OrmQ.objects.count()  # the first run's task (enqueued with the session)
    with django_capture_on_commit_callbacks(execute=True):
        assert Run.recover_stale(cutoff) == [run.pk]
    assert OrmQ.objects.count() == queued + 1  # enqueued again
    requeued = Run.objects.get(pk=run.pk)
    assert (requeued.status, requeued.attempt) == (Run.Status.QUEUED, 2)  # the next attempt resumes
    assert Run.recover_stale(cutoff) == []  # a fresh or queued run is left alone
    assert run.claim("second-worker") is True


def test_it_fails_a_run_that_keeps_losing_its_worker(session, settings):
    from datetime import timedelta

    from django.utils import timezone

    run = session.runs.get()
    cutoff = timezone.now() - timedelta(minutes=15)
    for attempt in range(settings.RUN_MAX_RECOVERIES + 1):
        run.claim(f"worker-{attempt}")
        Run.objects.filter(pk=run.pk).update(heartbeat=timezone.now() - timedelta(hours=1))
        Run.recover_stale(cutoff)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert "lost" in run.error
    assert Session.objects.get(pk=session.pk).status == "failed"
    assert Event.objects.filter(session=session, type="run_failed").exists()


def test_it_resumes_a_recovered_run_without_taking_the_follow_ups_sent_meanwhile(session):
    from datetime import timedelta

    from django.utils import timezone

    run = Run.objects.get(pk=session.runs.get().pk)
    assert run.claim("lost-worker") and run.recovered is False
    first_start = run.started
    follow_up = session.add_message("and also this")  # while the run is active: it waits
    Run.objects.filter(pk=run.pk).update(heartbeat=timezone.now() - timedelta(hours=1))
    assert Run.recover_stale(timezone.now() - timedelta(minutes=15)) == [run.pk]

    again = Run.objects.get(pk=run.pk)
    assert again.claim("second-worker") is True
    assert (again.recovered, again.attempt, again.started) == (True, 2, first_start)
    follow_up.refresh_from_db()
    assert follow_up.status == "pending" and follow_up.run_id is None  # for the next run
    assert list(session.messages.filter(status="claimed").values_list("position", flat=True)) == [1]
    started = Event.objects.filter(session=session, type="run_started").order_by("seq")
    assert [e.payload["attempt"] for e in started] == [1, 2]

"""Per-team concurrency: a team may have at most ``Team.concurrency_limit()`` runs running at once.

A run beyond the limit stays ``queued`` and its queue task ends (acknowledged): nothing polls for
it. It is queued again when a slot frees, by ``wake_waiting_runs`` after a run of its team stops
(``Run.finish``, ``Session.cancel``) and, as a safety net, by the one-minute recovery schedule.

Race safety: a limited team's claims take the team's row lock (``SELECT ... FOR NO KEY UPDATE``, which leaves foreign-key checks alone) and then
count in a *separate* statement, so the count sees every claim committed before the lock was
granted (one statement would count from a snapshot taken before it waited for the lock). Teams
without a limit never take the lock: their claim stays one statement.

A run waiting for its child sessions (``Run.waiting``, sessions/children.py) holds no slot: counting
it would let a team at its limit wait forever for children that cannot start.

Order: a run may start only if the runs running plus the team's runs queued *before* it leave a
slot, so waiting runs start oldest first, and ``queue_position`` (1 = starts next) is what it says.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from sessions.models import Run, Session, Team

log = logging.getLogger(__name__)


def lock_team(team_id: int) -> None:
    if connection.vendor != "postgresql":
        return  # SQLite: the IMMEDIATE transaction already holds the database's write lock
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT 1 FROM "{Team._meta.db_table}" WHERE id = %s FOR NO KEY UPDATE', [team_id])


def claim_within_limit(run: Run, owner: str, now) -> bool | str:
    """The claim of a limited team's run, under the team's row lock (the caller's transaction)."""
    team_id = Session.objects.filter(pk=run.session_id).values_list("team_id", flat=True).first()
    if team_id is None:
        return False
    lock_team(team_id)
    return run._claim_rows(owner, now, guard=Run.LIMIT_GUARD)


def _ahead(run: Run, team_id: int) -> int:
    """The team's runs running, plus those queued before ``run``."""
    return Run.objects.filter(
        Q(status=Run.Status.RUNNING, waiting=False) | Q(status=Run.Status.QUEUED, pk__lt=run.pk),
        session__team_id=team_id,
    ).count()


def slot_free(run: Run, team: Team) -> bool:
    """SQLite's claim check; its IMMEDIATE transactions already serialise claims."""
    limit = team.concurrency_limit()
    return not limit or _ahead(run, team.pk) < limit


def wake_waiting_runs(team_id: int, limit: int | None = None, lifted: bool = False) -> list[int]:
    """Queue again the team's oldest waiting runs, as many as it has free slots; returns their ids.

    ``lifted``: the team's limit was just removed (the admin), so all of them.

    Called after the change that freed a slot has committed, so the count sees it. A woken run may
    also have its own task still in the queue; the second claim is a no-op.
    """
    from sessions import tasks

    if limit is None:
        team = Team.objects.filter(pk=team_id).first()
        if team is None:
            return []
        limit = team.concurrency_limit()
    team_runs = Run.objects.filter(session__team_id=team_id)
    if limit:
        # A run waiting for its child sessions holds no slot (sessions/children.py).
        free = limit - team_runs.filter(status=Run.Status.RUNNING, waiting=False).count()
        if free <= 0:
            return []
        waiting = team_runs.filter(status=Run.Status.QUEUED).order_by("pk")[:free]
    elif lifted:  # the limit was just removed: every waiting run may start
        waiting = team_runs.filter(status=Run.Status.QUEUED).order_by("pk")
    else:  # no limit: nothing waits on the team, every queued run has its own task
        return []
    woken = list(waiting.values_list("pk", flat=True))
    for run_id in woken:
        tasks.enqueue_run(run_id)
    return woken


def wake_after_commit(team_id: int, limit: int | None = None) -> None:
    transaction.on_commit(lambda: _wake_logged(team_id, limit))


def _wake_logged(team_id: int, limit: int | None) -> None:
    try:
        wake_waiting_runs(team_id, limit)
    except Exception:  # the one-minute safety net retries; the run that stopped is not affected
        log.exception("could not queue the waiting runs of team %s", team_id)


def wake_all_waiting(older_than: float = 30.0) -> list[int]:
    """The safety net (every minute): teams with a limit whose runs have waited a while."""
    cutoff = timezone.now() - timedelta(seconds=older_than)
    team_ids = set(
        Run.objects.filter(status=Run.Status.QUEUED, created__lt=cutoff).values_list(
            "session__team_id", flat=True
        )
    )
    woken: list[int] = []
    for team in Team.objects.filter(pk__in=team_ids):
        if team.concurrency_limit():
            woken += wake_waiting_runs(team.pk, team.concurrency_limit())
    return woken


def queue_position_sql() -> RawSQL:
    """Annotation for session querysets: the place of the session's queued run among its team's
    queued runs (1 = starts next), for a team with a concurrency limit; NULL otherwise."""
    run, session, team = Run._meta.db_table, Session._meta.db_table, Team._meta.db_table
    return RawSQL(
        f'CASE WHEN "{session}".status = %s AND COALESCE((SELECT t.max_concurrent_runs FROM "{team}" t '
        f'WHERE t.id = "{session}".team_id), %s) > 0 THEN ('
        f'SELECT NULLIF(count(*), 0) FROM "{run}" q JOIN "{session}" qs ON qs.id = q.session_id '
        f'WHERE qs.team_id = "{session}".team_id AND q.status = %s AND q.id <= ('
        f'SELECT a.id FROM "{run}" a WHERE a.session_id = "{session}".id AND a.status = %s)) END',
        ["queued", settings.TEAM_MAX_CONCURRENT_RUNS, "queued", "queued"],
    )


def queue_position(session: Session) -> int | None:
    """The same for one session (a session that did not come through ``session_queryset``)."""
    if hasattr(session, "queue_place"):
        return session.queue_place
    if session.status != "queued" or not session.team.concurrency_limit():
        return None
    run = Run.objects.filter(session=session, status=Run.Status.QUEUED).first()
    if run is None:
        return None
    return Run.objects.filter(
        status=Run.Status.QUEUED, session__team_id=session.team_id, pk__lte=run.pk
    ).count()

"""Queue entry points: a few lines each, load by primary key and hand over to the runner."""

from __future__ import annotations

import logging

from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.tasks import async_task

_broker: tuple[tuple, object] | None = None


def queue_broker():
    """The configured broker, made once: ``async_task`` makes one per task otherwise (an import,
    a queryset, a cache lookup). Brokers keep no per-task state; ours (deputies/broker.py) sends each
    enqueue through the calling thread's own connection."""
    global _broker
    key = (Conf.BROKER_CLASS, Conf.CLUSTER_NAME, Conf.ORM)
    if _broker is None or _broker[0] != key:
        _broker = (key, get_broker())
    return _broker[1]


def enqueue_run(run_id: int) -> None:
    async_task(
        "sessions.tasks.execute_run", run_id, task_name=f"run-{run_id}", group="runs", broker=queue_broker()
    )


def execute_run(run_id: int) -> str:
    """Claim the run and start it on this worker process's run pool (sessions/workpool.py).

    Blocks while the pool is full, which is the queue's back-pressure; a run that found no slot
    before the task's own timeout is queued again rather than killed with the worker process.
    """
    from django.conf import settings

    from sessions.runner import Runner, claim, execute

    if settings.Q_CLUSTER.get("sync"):
        return execute(run_id)
    from sessions.workpool import get_pool

    pool = get_pool()
    if not pool.reserve(wait=settings.RUN_SLOT_WAIT):
        enqueue_run(run_id)
        return "requeued: no free run slot"
    run, why = claim(run_id)
    if run is None:
        pool.unreserve()
        return why
    pool.start(run.pk, Runner(run).execute)
    return "started"


def recover_stale_runs() -> str:
    """Scheduled every minute (see the migration that creates the Schedule). Also the safety net
    for runs waiting on their team's concurrency limit (sessions/limits.py)."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from sessions.limits import wake_all_waiting
    from sessions.models import Run

    cutoff = timezone.now() - timedelta(seconds=settings.RUN_LEASE_SECONDS)
    requeued = Run.recover_stale(cutoff)
    if woken := wake_all_waiting():
        logging.getLogger(__name__).info("queued again runs waiting on their team's limit: %s", woken)
    prune_task_results()
    return f"requeued {requeued}"


TASK_RESULTS_KEPT = 1000  # successful queue tasks kept for the admin and /setup


def prune_task_results(keep: int = TASK_RESULTS_KEPT) -> int:
    """Delete all but the newest ``keep`` successful tasks (the queue's ``save_limit`` is 0, see
    settings.Q_CLUSTER): two statements a minute instead of django-q2's read of them all per task."""
    from django_q.models import Success

    oldest_kept = Success.objects.order_by("-stopped").values_list("stopped", flat=True)[keep - 1 : keep]
    cutoff = next(iter(oldest_kept), None)
    if cutoff is None:
        return 0
    return Success.objects.filter(stopped__lt=cutoff).delete()[0]


def run_automations() -> str:
    """Scheduled every minute (see the migration that creates the Schedule): fire due automations
    and send due follow-ups (sessions/automations.py)."""
    from sessions.automations import run_due

    counts = run_due()
    return ", ".join(f"{n} {what}" for what, n in counts.items())

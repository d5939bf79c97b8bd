"""Queue entry points: a few lines each, load by primary key and hand over to the runner."""

from __future__ import annotations

from django_q.tasks import async_task


def enqueue_run(run_id: int) -> None:
    async_task("sessions.tasks.execute_run", run_id, task_name=f"run-{run_id}", group="runs")


def execute_run(run_id: int) -> str:
    from sessions.runner import execute

    return execute(run_id)


def recover_stale_runs() -> str:
    """Scheduled every minute (see the migration that creates the Schedule)."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from sessions.models import Run

    cutoff = timezone.now() - timedelta(seconds=settings.RUN_LEASE_SECONDS)
    return f"requeued {Run.recover_stale(cutoff)}"

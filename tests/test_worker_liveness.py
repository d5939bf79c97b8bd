"""/setup shows the workers' real liveness: each `deputies worker` process keeps a row fresh and
removes it when it stops; the page reads those rows, not a per-process cache."""

from __future__ import annotations

import resource
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from sessions.models import WorkerProcess
from sessions.web.setup_checks import check_queue
from tests.live import child_env, stop_process, wait_for, worker_process


@pytest.mark.django_db
def test_it_upserts_one_row_per_worker_and_forgets_silent_ones():
    started = timezone.now()
    WorkerProcess.beat("h:1", "h", 1, started, running=0, slots=48)
    WorkerProcess.beat("h:1", "h", 1, started, running=3, slots=48)
    WorkerProcess.beat("h:2", "h", 2, started, running=0, slots=48)
    assert WorkerProcess.objects.count() == 2 and WorkerProcess.objects.get(name="h:1").running == 3
    WorkerProcess.objects.filter(name="h:2").update(last_seen=timezone.now() - timedelta(minutes=5))
    assert [w.name for w in WorkerProcess.alive()] == ["h:1"]


@pytest.mark.django_db
def test_it_says_no_worker_is_alive_and_how_to_start_one():
    check = check_queue()
    assert (check.status, check.summary) == ("warn", "No worker has reported in the last minute.")
    assert "deputies worker" in check.fix
    WorkerProcess.beat("h:1", "h", 1, timezone.now(), running=2, slots=48)
    check = check_queue()
    assert (check.status, check.summary) == ("ok", "1 worker(s) alive with 48 run slots.")
    assert any("2 of 48 run slots busy" in value for _, value in check.details)


@pytest.mark.django_db(transaction=True)
def test_it_shows_a_real_worker_while_it_runs_and_not_after_it_stops(tmp_path):
    with worker_process(child_env(tmp_path)) as proc:
        wait_for(lambda: WorkerProcess.alive().filter(pid=proc.pid).exists(), timeout=30, what="the beat")
        assert check_queue().status == "ok"
        stop_process(proc)
        wait_for(
            lambda: not WorkerProcess.objects.filter(pid=proc.pid).exists(), timeout=30, what="its row gone"
        )


@pytest.mark.django_db(transaction=True)
def test_it_lifts_its_soft_open_files_limit_for_hundreds_of_runs(tmp_path):
    """Each running run holds a socket to its model (and pipes while a command runs): a worker with
    hundreds of runs must not stop at a soft limit of 1,024 when the hard limit allows more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open files limit ({hard}) leaves nothing to lift")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the worker inherits it
    try:
        with worker_process(child_env(tmp_path)) as proc:
            wait_for(lambda: WorkerProcess.alive().filter(pid=proc.pid).exists(), timeout=30, what="the beat")
            limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    row = next(line for line in limits if line.startswith("Max open files")).split()
    expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert row[3:5] == [expected, expected]

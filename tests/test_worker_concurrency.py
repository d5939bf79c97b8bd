"""Many runs in one worker process, on real processes: ONE `deputies worker`, a slow scripted model.

Each model call takes about a second, so a dozen runs one after another would take well over 12 s;
on the run pool (sessions/workpool.py) they overlap. Then the worker is killed with SIGKILL mid-run,
and lease recovery queues the runs again and a new worker finishes them; and a SIGTERM lets runs in
flight finish.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from django_q.models import OrmQ

from sessions.agent.fake_llm import start_in_thread
from sessions.models import Event, Repository, Run, Session, start_session
from sessions.tasks import recover_stale_runs
from tests.live import child_env, stop_process, wait_for, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def slow_script(calls: int) -> dict:
    """``calls`` model turns of ~1 s each: list the files, then finish on the last one."""
    responses = [{"tool_calls": [{"name": "list_files", "arguments": {}}], "delay": 1.0}] * (calls - 1)
    return {
        "responses": [
            *responses,
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}], "delay": 1.0},
        ]
    }


def start_sessions(team, owner, sample_repo: Path, count: int) -> list[int]:
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    return [
        start_session(
            team=team, repository=repository, prompt=f"task {n}", model="scripted/slow", created_by=owner
        ).pk
        for n in range(count)
    ]


def worker_env(tmp_path: Path, fake, **extra: str) -> dict[str, str]:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    return child_env(
        data_dir,
        DEPUTIES_WORKERS="1",
        DEPUTIES_RUNS_PER_WORKER="16",
        DEPUTIES_LLM_PROVIDERS="scripted",
        DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
        DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
        DEPUTIES_SANDBOX_ISOLATION="none",
        **extra,
    )


def finished(session_ids: list[int]) -> bool:
    return not Session.objects.filter(pk__in=session_ids).exclude(status__in=("completed", "failed")).exists()


def worker_log(env: dict[str, str], name: str = "worker") -> str:
    return (Path(env["DEPUTIES_DATA_DIR"]) / f"{name}.log").read_text()[-4000:]


def assert_clean_history(session_ids: list[int]) -> None:
    """Every session completed by one Run, with gap-free events and one run_completed."""
    for sid in session_ids:
        session = Session.objects.get(pk=sid)
        assert session.status == "completed", (sid, session.status, session.error)
        seqs = list(Event.objects.filter(session_id=sid).order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, len(seqs) + 1)), sid
        types = list(Event.objects.filter(session_id=sid).values_list("type", flat=True))
        assert types.count("run_completed") == 1, (sid, types)
        assert list(Run.objects.filter(session_id=sid).values_list("status", flat=True)) == ["completed"]


def max_overlap(session_ids: list[int]) -> int:
    """The most runs that were running at the same moment, from their start and finish times."""
    edges = []
    for started, ended in Run.objects.filter(session_id__in=session_ids).values_list("started", "finished"):
        edges += [(started, 1), (ended, -1)]
    running = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def test_it_runs_a_dozen_sessions_at_once_in_one_worker_process(tmp_path, team, owner, sample_repo):
    with start_in_thread(slow_script(2)) as fake:
        env = worker_env(tmp_path, fake)
        with worker_process(env):
            submitted = time.monotonic()
            session_ids = start_sessions(team, owner, sample_repo, 12)
            wait_for(lambda: finished(session_ids), timeout=60, what="12 sessions to finish")
            elapsed = time.monotonic() - submitted  # includes the cluster's own start-up
            log = worker_log(env)
    assert_clean_history(session_ids)
    runs = Run.objects.filter(session_id__in=session_ids)
    span = (max(r.finished for r in runs) - min(r.started for r in runs)).total_seconds()
    # Serially: 12 runs x 2 model calls x 1 s = 24 s at least.
    assert span < 8 and elapsed < 12, (span, elapsed, log)
    assert "Traceback" not in log, log
    assert max_overlap(session_ids) >= 8, log
    owners = set(Run.objects.filter(session_id__in=session_ids).values_list("lease_owner", flat=True))
    assert len(owners) == 1, owners  # one worker process ran them all


def test_it_recovers_the_runs_of_a_worker_killed_mid_run(settings, tmp_path, team, owner, sample_repo):
    settings.RUN_LEASE_SECONDS = 4  # this process runs the recovery; the worker beats within it
    with start_in_thread(slow_script(4)) as fake:
        env = worker_env(tmp_path, fake, DEPUTIES_RUN_LEASE="4")
        with worker_process(env) as proc:
            session_ids = start_sessions(team, owner, sample_repo, 6)
            # Mid-run: every run has started and spoken to the model at least once.
            wait_for(
                lambda: (
                    Event.objects.filter(session_id__in=session_ids, type="usage")
                    .values("session_id")
                    .distinct()
                    .count()
                    == 6
                ),
                timeout=30,
                what="all six runs to be mid-way",
            )
            assert not finished(session_ids)
            owners = set(Run.objects.filter(session_id__in=session_ids).values_list("lease_owner", flat=True))
            assert len(owners) == 1, owners
            killed = owners.pop()
            pid = int(killed.rsplit(":", 1)[1])
            assert pid == proc.pid
            os.kill(pid, signal.SIGKILL)  # the worker process and every run thread in it

            # What the every-minute schedule does, called as soon as the 4 s lease has run out.
            requeued: set[int] = set()

            def recovered() -> bool:
                text = recover_stale_runs()
                requeued.update(json.loads(text.removeprefix("requeued ")))
                return len(requeued) == 6

            wait_for(recovered, timeout=30, interval=0.2, what="lease recovery of the six runs")
            assert proc.wait(timeout=5) == -signal.SIGKILL
        # What a supervisor (systemd, docker) does: start the worker again. It finishes the runs.
        with worker_process(env, name="worker-2"):
            wait_for(lambda: finished(session_ids), timeout=60, what="the recovered runs to finish")
            log = worker_log(env, "worker-2")

    for sid in session_ids:
        session = Session.objects.get(pk=sid)
        assert session.status == "completed", (sid, session.error, log)
        events = list(Event.objects.filter(session_id=sid).order_by("seq"))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        types = [e.type for e in events]
        assert types.count("run_requeued") == 1 and types.count("run_completed") == 1, types
        assert types.index("run_requeued") < types.index("run_completed")
        runs = list(Run.objects.filter(session_id=sid))
        assert len(runs) == 1 and runs[0].status == "completed"  # the same Run, claimed again
        assert runs[0].lease_owner not in ("", killed)


def test_it_lets_runs_in_flight_finish_when_the_worker_is_stopped(tmp_path, team, owner, sample_repo):
    with start_in_thread(slow_script(3)) as fake:
        env = worker_env(tmp_path, fake, DEPUTIES_WORKER_GRACE="12")
        with worker_process(env) as proc:
            session_ids = start_sessions(team, owner, sample_repo, 4)
            wait_for(
                lambda: Run.objects.filter(session_id__in=session_ids, status="running").count() == 4,
                timeout=30,
                what="four runs to start",
            )
            stop_process(proc, timeout=20)  # SIGTERM: the worker stops taking work, runs finish
            assert proc.returncode == 0, worker_log(env)
    assert_clean_history(session_ids)
    assert not Event.objects.filter(session_id__in=session_ids, type="run_requeued").exists()


def test_it_delivers_again_the_run_of_a_worker_killed_before_it_claimed_it(
    tmp_path, team, owner, sample_repo
):
    """Killed after taking the run's queue task, before its claim committed: the run is still
    queued and nobody's lease covers it, so the queue's own retry (two leases) brings it back."""
    import psycopg
    from django.db import connection
    from django.utils import timezone

    from deputies.broker import listen_kwargs

    if connection.vendor != "postgresql":
        pytest.skip("holds the claim back with a Postgres row lock")
    with start_in_thread(slow_script(1)) as fake:
        env = worker_env(tmp_path, fake, DEPUTIES_RUN_LEASE="3")
        [sid] = start_sessions(team, owner, sample_repo, 1)
        run, task = Run.objects.get(session_id=sid), OrmQ.objects.get()
        with psycopg.connect(**listen_kwargs()) as blocker, psycopg.connect(**listen_kwargs()) as watcher:
            with blocker.transaction():  # the worker's claim waits on this lock of the run's row
                blocker.execute(f"SELECT 1 FROM {Run._meta.db_table} WHERE id = %s FOR UPDATE", [run.pk])
                with worker_process(env) as proc:

                    def claim_waiting() -> bool:
                        row = watcher.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' "
                            "AND query LIKE '%%lease_owner%%'"
                        ).fetchone()
                        return row[0] == 1

                    wait_for(claim_waiting, timeout=30, what="the worker to take the task and claim")
                    os.kill(proc.pid, signal.SIGKILL)
                    assert proc.wait(timeout=5) == -signal.SIGKILL
        # The claim died with its connection: the run is queued and its task taken, not acknowledged.
        run.refresh_from_db()
        assert run.status == "queued" and OrmQ.objects.get(pk=task.pk).lock > timezone.now()
        with worker_process(env, name="worker-2"):
            wait_for(lambda: finished([sid]), timeout=30, what="the run to be delivered again")
            log = worker_log(env, "worker-2")
    assert_clean_history([sid])
    assert not OrmQ.objects.filter(pk=task.pk).exists(), log


def test_it_never_hands_out_again_a_task_it_is_still_working_on(tmp_path):
    """The queue's retry is two leases (4 s here), shorter than this task: the worker keeps holding
    it, so it runs once."""
    from django_q.tasks import async_task

    trace = tmp_path / "ran"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = child_env(data_dir, DEPUTIES_RUN_LEASE="2")
    async_task("subprocess.run", ["sh", "-c", f"echo ran >> {trace}; sleep 7"], check=True, task_name="slow")
    task = OrmQ.objects.get()
    with worker_process(env):
        wait_for(lambda: trace.exists(), timeout=30, what="the task to start")
        wait_for(lambda: not OrmQ.objects.filter(pk=task.pk).exists(), timeout=30, what="the task to end")
        log = worker_log(env)
    assert trace.read_text() == "ran\n", log

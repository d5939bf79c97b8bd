"""Crash resume: a run whose worker is lost goes on from its last step, on real processes.

The fault-injection test SIGKILLs the `deputies worker` at seeded random moments while 20 runs are in
their agent loops (a scripted model with slow steps, each step a command that appends a line to a
file in the workspace), starting a new worker after each kill as a supervisor would. Afterwards every
run completed, resumed from its checkpoint: no planned command ran twice, the model was asked at most
once more per kill, the interrupted tool calls were closed and the model told, event sequences are
gap-free, attempts are numbered and no sandbox is left over.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from django.db import connection

from sandboxes.models import Sandbox
from sandboxes.reaper import ReapReport, destroy_sandbox, reap_checkouts
from sessions.agent.fake_llm import conversation_key, start_in_thread
from sessions.agent.loop import INTERRUPTED
from sessions.models import Artifact, Event, LLMCall, Repository, Run, Session, start_session
from sessions.runner import checkout_dir, execute
from tests.live import child_env, wait_for, worker_process

pytestmark = [pytest.mark.django_db(transaction=True)]

SEED = 11
RUNS = 20
STEPS = 5  # commands in the plan; then `finish`
KILLS = 3
LEASE = 4  # seconds


def plan(steps: int = STEPS, model_delay: float = 0.4, command_delay: float = 0.5) -> dict:
    """``steps`` slow commands, each appending its own line to plan.log, then finish."""
    command = "sleep {delay}; echo step-{n} >> plan.log"
    responses = [
        {
            "tool_calls": [
                {"name": "bash", "arguments": {"command": command.format(delay=command_delay, n=n)}}
            ],
            "delay": model_delay,
        }
        for n in range(steps)
    ]
    responses.append(
        {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}], "delay": model_delay}
    )
    return {"responses": responses}


def worker_env(tmp_path: Path, fake, **extra: str) -> dict[str, str]:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    return child_env(
        data_dir,
        DEPUTIES_RUNS_PER_WORKER=str(RUNS),
        DEPUTIES_LLM_PROVIDERS="scripted",
        DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
        DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
        DEPUTIES_SANDBOX_ISOLATION="none",
        # Short, so kills recover fast; long enough for heartbeats (every lease/3) on a busy machine.
        DEPUTIES_RUN_LEASE=str(LEASE),
        **extra,
    )


def start_sessions(team, owner, repo: Path, count: int, rng: random.Random | None = None) -> list[int]:
    """``rng``: seeded gaps between submissions, so the runs are at different points of their steps."""
    repository = Repository.objects.create(team=team, name="sample", url=str(repo), provider="local")
    ids = []
    for n in range(count):
        if rng is not None:
            time.sleep(rng.uniform(0, 0.1))  # part of the seeded schedule
        ids.append(
            start_session(
                team=team, repository=repository, prompt=f"task {n}", model="scripted/plan", created_by=owner
            ).pk
        )
    return ids


def finished(session_ids: list[int]) -> bool:
    return not Session.objects.filter(pk__in=session_ids).exclude(status__in=("completed", "failed")).exists()


def types_of(session_id: int) -> list[str]:
    return list(Event.objects.filter(session_id=session_id).order_by("seq").values_list("type", flat=True))


def plan_log(sandbox_root: Path, session_id: int, status: str | None = None) -> list[str]:
    sandboxes = Sandbox.objects.filter(session_id=session_id)
    sandbox = (sandboxes.filter(status=status) if status else sandboxes).get()
    return (sandbox_root / sandbox.external_id / "workspace" / "plan.log").read_text().split()


def kill_in_second_command(env: dict[str, str], sid: int) -> float:
    """Start a worker, SIGKILL it once the session's second command has started; when it was killed."""
    with worker_process(env, name="worker-0") as proc:
        wait_for(
            lambda: Event.objects.filter(
                session_id=sid, type="tool_started", payload__call_id="call_1_0"
            ).exists(),
            timeout=30,
            what="the second command to start",
        )
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    return killed


def in_process_session(run_settings, team, owner, repo: Path, fake) -> Session:
    """A session on ``repo`` whose runs, executed in this process, ask the scripted model ``fake``."""
    run_settings.LLM_PROVIDERS = {"scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}}
    repository = Repository.objects.create(team=team, name="r", url=str(repo), provider="local")
    return start_session(team=team, repository=repository, prompt="Go", model="scripted/x", created_by=owner)


def lose_sandbox(tmp_path: Path, sid: int) -> Sandbox:
    """The session's sandbox is gone with its host."""
    lost = Sandbox.objects.get(session_id=sid)
    shutil.rmtree(tmp_path / "sandboxes" / lost.external_id)
    return lost


def test_it_resumes_every_run_after_the_worker_is_killed_at_random_points(
    settings, tmp_path, team, owner, sample_repo
):
    rng = random.Random(SEED)
    settings.MEDIA_ROOT = tmp_path / "data" / "media"  # where the workers store artifacts
    with start_in_thread(plan()) as fake:
        env = worker_env(tmp_path, fake)
        worker = worker_process(env, name="worker-0")
        proc = worker.__enter__()
        session_ids = start_sessions(team, owner, sample_repo, RUNS, rng)
        try:
            wait_for(
                lambda: (
                    Event.objects.filter(session_id__in=session_ids, type="usage")
                    .values("session_id")
                    .distinct()
                    .count()
                    == RUNS
                ),
                timeout=40,
                what="every run to be in its agent loop",
            )
            for k in range(KILLS):
                time.sleep(rng.uniform(0.2, 1.6))  # the seeded kill schedule, not a wait for something
                victims = set(
                    Run.objects.filter(session_id__in=session_ids, status="running").values_list(
                        "pk", flat=True
                    )
                )
                resumed_before = Event.objects.filter(run_id__in=victims, type="run_resumed").count()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                worker.__exit__(None, None, None)
                worker = worker_process(env, name=f"worker-{k + 1}")  # what a supervisor does
                proc = worker.__enter__()
                if victims:
                    wait_for(
                        lambda v=victims, b=resumed_before: (
                            Event.objects.filter(run_id__in=v, type="run_resumed").count()
                            + Run.objects.filter(pk__in=v)
                            .exclude(status="running")
                            .exclude(status="queued")
                            .count()
                            >= b + len(v)
                        ),
                        timeout=30,
                        what=f"the runs of kill {k + 1} to resume",
                    )
            wait_for(lambda: finished(session_ids), timeout=60, what="every run to finish")
        finally:
            worker.__exit__(None, None, None)
        # A request cut off by a kill is recorded with its raw (partial) body: it never reached the model.
        requests = [r for r in fake.requests if isinstance(r["body"], dict)]

    calls_per_conversation = Counter(conversation_key(r["body"]["messages"]) for r in requests)
    told: set[str] = {
        m["tool_call_id"]
        for r in requests
        for m in r["body"]["messages"]
        if m.get("role") == "tool" and m.get("content") == INTERRUPTED
    }
    planned_calls = STEPS + 1
    requeues_total = interrupted_total = asked_again = 0
    sandbox_root = tmp_path / "sandboxes"
    for sid in session_ids:
        session = Session.objects.get(pk=sid)
        assert session.status == "completed", (sid, session.error)
        events = list(Event.objects.filter(session_id=sid).order_by("seq"))
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), sid
        types = [e.type for e in events]
        assert types.count("run_completed") == 1, (sid, types)
        (run,) = Run.objects.filter(session_id=sid)
        requeues = types.count("run_requeued")
        requeues_total += requeues
        # Attempts numbered 1, 2, ...: one per claim; each recovered one resumed.
        started = [e.payload["attempt"] for e in events if e.type == "run_started"]
        assert started == list(range(1, requeues + 2)) and run.attempt == requeues + 1, (sid, started)
        resumed = [e.payload for e in events if e.type == "run_resumed"]
        assert [p["attempt"] for p in resumed] == list(range(2, requeues + 2)), (sid, resumed)
        assert all(p["sandbox"] == "reconnected" for p in resumed), resumed
        # Every tool call that started was closed, the lost ones as interrupted (and the model told).
        started_calls = Counter(e.payload["call_id"] for e in events if e.type == "tool_started")
        finished_calls = Counter(e.payload["call_id"] for e in events if e.type == "tool_finished")
        assert started_calls == finished_calls, (sid, started_calls, finished_calls)
        interrupted = {
            e.payload["call_id"] for e in events if e.type == "tool_finished" and e.payload.get("interrupted")
        }
        interrupted_total += len(interrupted)
        assert interrupted <= told, (sid, interrupted, told)
        # No planned command ran twice; every one that was not interrupted ran once.
        lines = Counter(plan_log(sandbox_root, sid))
        for n in range(STEPS):
            call_id = f"call_{n}_0"  # the scripted server's ids: call_<index>_<n>
            if call_id in interrupted:
                assert lines[f"step-{n}"] <= 1, (sid, lines)
            else:
                assert lines[f"step-{n}"] == 1, (sid, n, lines)
        # The model: the plan's calls, plus at most one per time this run lost its worker.
        first_request = next(
            r for r in requests if r["body"]["messages"][1]["content"] == f"task {session_ids.index(sid)}"
        )
        asked = calls_per_conversation[conversation_key(first_request["body"]["messages"])]
        assert planned_calls <= asked <= planned_calls + requeues, (sid, asked, requeues)
        asked_again += asked - planned_calls
        assert LLMCall.objects.filter(session_id=sid, outcome="ok").count() <= planned_calls + requeues
        diff = Artifact.objects.filter(session_id=sid, kind="diff").get()
        with diff.file.open("rb") as fh:
            text = fh.read().decode()
        assert all(f"+step-{n}" in text for n in range(STEPS) if f"call_{n}_0" not in interrupted), text
    # No orphaned sandbox: one ready sandbox per session (reconnected), and no directory besides them.
    ready = set(Sandbox.objects.filter(session_id__in=session_ids).values_list("status", "external_id"))
    assert {status for status, _ in ready} == {"ready"} and len(ready) == RUNS
    assert {p.name for p in sandbox_root.iterdir()} == {external_id for _, external_id in ready}
    # Every kill hit runs in flight, some in a command and some waiting on the model.
    assert requeues_total >= KILLS and interrupted_total >= 1 and asked_again >= 1, (
        requeues_total,
        interrupted_total,
        asked_again,
    )
    print(
        f"{requeues_total} runs resumed, {interrupted_total} commands interrupted, {asked_again} model calls redone"
    )


def test_it_tells_the_model_a_command_was_interrupted_and_does_not_run_it_again(
    tmp_path, team, owner, sample_repo
):
    """Killed while the plan's second command runs: it is closed as interrupted, not run again, and
    the model is not asked again for the step it was in."""
    with start_in_thread(plan(steps=3, model_delay=0.05, command_delay=3)) as fake:
        env = worker_env(tmp_path, fake)
        (sid,) = start_sessions(team, owner, sample_repo, 1)
        killed = kill_in_second_command(env, sid)
        with worker_process(env, name="worker-1"):
            wait_for(
                lambda: Event.objects.filter(session_id=sid, type="run_resumed").exists(),
                timeout=30,
                what="the run to resume",
            )
            latency = time.monotonic() - killed
            wait_for(lambda: finished([sid]), timeout=30, what="the run to finish")
        requests = fake.requests

    assert latency < 2 * LEASE + 3, latency  # under two leases, plus a worker's start-up
    assert Session.objects.get(pk=sid).status == "completed"
    types = types_of(sid)
    resumed = Event.objects.get(session_id=sid, type="run_resumed").payload
    assert resumed["from_step"] == 2 and resumed["attempt"] == 2 and resumed["sandbox"] == "reconnected"
    closed = Event.objects.get(session_id=sid, type="tool_finished", payload__call_id="call_1_0").payload
    assert closed["interrupted"] is True and closed["ok"] is False and closed["output"] == INTERRUPTED
    assert types.index("run_resumed") < types.index("tool_finished", types.index("run_requeued"))
    assert len(requests) == 4  # 3 commands + finish: the step in flight was not asked again
    last = requests[2]["body"]["messages"]
    assert last[-1] == {"role": "tool", "tool_call_id": "call_1_0", "content": INTERRUPTED}
    # The command in flight was not run again (the lost worker's child may still have finished it).
    wait_for(lambda: time.monotonic() - killed > 3.5, timeout=10, what="the lost command's sleep to end")
    lines = Counter(plan_log(tmp_path / "sandboxes", sid))
    assert lines["step-0"] == 1 and lines["step-2"] == 1 and lines["step-1"] <= 1, lines


def test_it_resumes_in_a_new_sandbox_with_the_saved_workspace_when_the_old_one_is_gone(
    settings, tmp_path, team, owner, sample_repo
):
    """The worker's host is lost with the sandbox on it: the resumed attempt makes a new sandbox and
    restores the workspace from the run's last checkpoint artifact."""
    settings.MEDIA_ROOT = tmp_path / "data" / "media"
    with start_in_thread(plan(steps=3, model_delay=0.05, command_delay=2)) as fake:
        env = worker_env(tmp_path, fake)
        (sid,) = start_sessions(team, owner, sample_repo, 1)
        kill_in_second_command(env, sid)
        lost = lose_sandbox(tmp_path, sid)
        with worker_process(env, name="worker-1"):
            wait_for(lambda: finished([sid]), timeout=30, what="the run to finish")

    assert Session.objects.get(pk=sid).status == "completed"
    resumed = Event.objects.get(session_id=sid, type="run_resumed").payload
    checkpoint = Artifact.objects.get(pk=resumed["restored_artifact_id"])
    assert (resumed["sandbox"], resumed["from_step"], checkpoint.kind) == ("recreated", 2, "checkpoint")
    assert checkpoint.name.endswith("-step-1.diff")  # the workspace after the first command
    assert Event.objects.get(session_id=sid, type="workspace_restored").payload["changed"] == 1
    statuses = dict(Sandbox.objects.filter(session_id=sid).values_list("external_id", "status"))
    assert statuses.pop(lost.external_id) == "destroyed" and list(statuses.values()) == ["ready"]
    # The first command's line came back with the checkpoint; the interrupted one was lost with the
    # old sandbox and not run again; the third ran in the new one.
    assert plan_log(tmp_path / "sandboxes", sid, status="ready") == ["step-0", "step-2"]
    diff = Artifact.objects.get(session_id=sid, kind="diff")
    with diff.file.open("rb") as fh:
        text = fh.read().decode()
    assert "+step-0\n+step-2\n" in text, text


def test_it_gives_a_follow_up_the_previous_work_after_the_sandbox_was_reaped(
    run_settings, team, owner, sample_repo
):
    script = {
        "responses": [
            {
                "tool_calls": [
                    {"name": "write_file", "arguments": {"path": "notes.txt", "content": "first run\n"}}
                ]
            },
            {
                "tool_calls": [
                    {"name": "bash", "arguments": {"command": "rm README.md && echo '# changed' >> calc.py"}}
                ]
            },
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "first"}}]},
            # The follow-up looks at what the first run left.
            {
                "tool_calls": [
                    {"name": "bash", "arguments": {"command": "cat notes.txt; ls; tail -1 calc.py"}}
                ]
            },
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "second"}}]},
        ]
    }
    with start_in_thread(script) as fake:
        session = in_process_session(run_settings, team, owner, sample_repo, fake)
        assert execute(session.runs.get().pk) == "completed"
        first = Sandbox.objects.get(session=session)
        assert destroy_sandbox(first, "idle for the test")  # what the reaper does to an idle sandbox
        report = ReapReport()
        reap_checkouts(report)  # and the worker's checkout of the session goes with it
        assert report.checkouts == [f"session-{session.pk}"]
        session.add_message("Now look at it")
        follow_up = session.runs.get(status="queued")
        assert execute(follow_up.pk) == "completed"

    output = Event.objects.get(
        session=session, run=follow_up, type="tool_finished", payload__name="bash"
    ).payload["output"]
    assert "first run" in output and "# changed" in output
    assert "README.md" not in output.split("first run", 1)[1]  # the deletion was restored too
    restored = Event.objects.get(session=session, run=follow_up, type="workspace_restored").payload
    assert (restored["changed"], restored["deleted"]) == (2, 1)
    assert Sandbox.objects.filter(session=session, status="ready").exclude(pk=first.pk).count() == 1
    # The follow-up's diff (against the same base commit) has both runs' work.
    diff = Artifact.objects.filter(session=session, kind="diff").order_by("-created").first()
    with diff.file.open("rb") as fh:
        text = fh.read().decode()
    assert "notes.txt" in text and "README.md" in text and "+# changed" in text
    commits = [e.payload["commit"] for e in Event.objects.filter(session=session, type="repository_ready")]
    assert len(commits) == 2 and commits[0] == commits[1]


def test_it_diffs_a_follow_up_in_the_sandbox_of_a_run_that_changed_nothing(
    run_settings, team, owner, sample_repo
):
    """The first run leaves the workspace alone, so no trusted checkout is written for it; the
    follow-up, in the same sandbox, diffs against one written then from the same base commit."""
    script = {
        "responses": [
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "nothing to do"}}]},
            {
                "tool_calls": [
                    {"name": "bash", "arguments": {"command": "rm README.md && echo later > notes.txt"}}
                ]
            },
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "second"}}]},
        ]
    }
    with start_in_thread(script) as fake:
        session = in_process_session(run_settings, team, owner, sample_repo, fake)
        assert execute(session.runs.get().pk) == "completed"
        assert not Artifact.objects.filter(session=session, kind="diff").exists()
        assert not checkout_dir(session.pk).exists()
        session.add_message("Now change it")
        follow_up = session.runs.get(status="queued")
        assert execute(follow_up.pk) == "completed"

    assert Sandbox.objects.filter(session=session).count() == 1  # the follow-up reused the sandbox
    (diff,) = Artifact.objects.filter(session=session, kind="diff")
    with diff.file.open("rb") as fh:
        text = fh.read().decode()
    assert "deleted file mode" in text and "+later" in text
    assert [line for line in text.splitlines() if line.startswith("diff --git")] == [
        "diff --git a/README.md b/README.md",
        "diff --git a/notes.txt b/notes.txt",
    ]


def test_it_finishes_a_run_after_its_database_connections_are_terminated(tmp_path, team, owner, sample_repo):
    """Postgres dropping the worker's connections (a restart, a failover): it reconnects."""
    if connection.vendor != "postgresql":
        pytest.skip("needs Postgres")
    with start_in_thread(plan(steps=3, model_delay=0.5, command_delay=0.5)) as fake:
        env = worker_env(tmp_path, fake)
        (sid,) = start_sessions(team, owner, sample_repo, 1)
        with worker_process(env, name="worker-0"):
            wait_for(
                lambda: Event.objects.filter(session_id=sid, type="usage").exists(),
                timeout=30,
                what="the run to be in its agent loop",
            )
            with connection.cursor() as cursor:  # only this test database's other backends
                cursor.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                assert cursor.fetchone()[0] >= 1
            wait_for(lambda: finished([sid]), timeout=60, what="the run to end")
    # The statement above also cut this process's idle pooled connections: start the pool afresh so
    # later tests in this process do not wait on dead ones.
    connection.close()
    connection.close_pool()
    session = Session.objects.get(pk=sid)
    # A query cut off mid-flight may fail the run, then with the database's own words as the reason.
    assert session.status == "completed" or (
        session.status == "failed" and "OperationalError" in session.error and "connection" in session.error
    ), session.error
    seqs = list(Event.objects.filter(session_id=sid).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))


def test_it_saves_a_checkpoint_only_after_steps_that_changed_the_workspace(
    run_settings, team, owner, sample_repo
):
    commands = [
        "true",  # the workspace is still the base commit's: nothing to save
        "echo one >> notes.txt",
        "echo ONE > notes.txt",  # the same size, straight after the stamp of the step before
        "cat notes.txt",
        "rm notes.txt",  # undone: an empty diff says so
        "ls",
    ]
    script = {
        "responses": [{"tool_calls": [{"name": "bash", "arguments": {"command": c}}]} for c in commands]
        + [{"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}]
    }
    with start_in_thread(script) as fake:
        session = in_process_session(run_settings, team, owner, sample_repo, fake)
        assert execute(session.runs.get().pk) == "completed"

    saved = {}
    for artifact in Artifact.objects.filter(session=session, kind="checkpoint"):
        with artifact.file.open("rb") as fh:
            saved[artifact.name.rsplit("-", 1)[1]] = fh.read().decode()
    # Step 4 saves again only when step 3's write and its stamp fell in one tick of the filesystem's
    # clock (tree_stamp cannot tell then), and then the same diff.
    assert {"2.diff", "3.diff", "5.diff"} <= set(saved) <= {"2.diff", "3.diff", "4.diff", "5.diff"}, saved
    assert "+one" in saved["2.diff"] and "+ONE" in saved["3.diff"] and saved["5.diff"] == ""
    assert saved.get("4.diff", saved["3.diff"]) == saved["3.diff"]


def test_it_resumes_on_the_lost_attempts_commit_when_no_step_changed_the_workspace(
    settings, tmp_path, team, owner, sample_repo
):
    """Steps that change no file save no checkpoint; a resumed attempt in a new sandbox still gets
    the tree those steps saw, not the base branch's newer tip."""
    settings.MEDIA_ROOT = tmp_path / "data" / "media"
    script = plan(steps=3, model_delay=0.05, command_delay=2)
    for response in script["responses"][:-1]:
        response["tool_calls"][0]["arguments"]["command"] = "sleep 2; cat README.md"
    with start_in_thread(script) as fake:
        env = worker_env(tmp_path, fake)
        (sid,) = start_sessions(team, owner, sample_repo, 1)
        kill_in_second_command(env, sid)
        lose_sandbox(tmp_path, sid)
        (sample_repo / "later.txt").write_text("pushed while the run was lost\n")
        git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@e", "PATH": "/usr/bin:/bin"}  # fmt: skip
        subprocess.run(["git", "add", "-A"], cwd=sample_repo, check=True, env=git)
        subprocess.run(["git", "commit", "-q", "-m", "later"], cwd=sample_repo, check=True, env=git)
        with worker_process(env, name="worker-1"):
            wait_for(lambda: finished([sid]), timeout=30, what="the run to finish")

    assert Session.objects.get(pk=sid).status == "completed"
    assert not Artifact.objects.filter(session_id=sid, kind="checkpoint").exists()
    resumed = Event.objects.get(session_id=sid, type="run_resumed").payload
    assert (resumed["sandbox"], resumed["from_step"], resumed["restored_artifact_id"]) == (
        "recreated",
        2,
        None,
    )
    commits = [e.payload["commit"] for e in Event.objects.filter(session_id=sid, type="repository_ready")]
    assert len(commits) == 2 and commits[0] == commits[1]
    assert not Artifact.objects.filter(session_id=sid, kind="diff").exists()  # nothing changed

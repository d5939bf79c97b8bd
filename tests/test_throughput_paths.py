"""The worker's shortened paths keep their guarantees: real database, real git, real sandbox."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tarfile
import threading
from decimal import Decimal

import pytest
from django.db import connection

from sandboxes.base import PathEscape, SandboxError, SandboxSpec
from sandboxes.providers.local import LocalProvider
from sessions import repocache
from sessions.budgets import RunBudget
from sessions.models import Checkpoint, Event, LLMCall, Message, Run, Session, start_session
from sessions.runner import claim
from tests.conftest import make_git_repo
from tests.sandbox_contract import make_tar
from tests.test_setup_script import GIT_ENV


def claimed(team, owner, repository) -> Run:
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/x", created_by=owner
    )
    run, why = claim(session.runs.get().pk)
    assert run is not None, why
    return run


def test_finish_closes_the_run_session_messages_and_events_together(team, owner, repository):
    run = claimed(team, owner, repository)
    run.steps = 3
    transcript = [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "done"}]

    assert run.finish(
        Run.Status.COMPLETED,
        session_fields={"transcript": transcript, "summary": "all done"},
        events=[
            ("run_completed", {"run_id": run.pk, "summary": "all done"}),
            ("status", {"status": "completed"}),
        ],
    )

    stored = Run.objects.get(pk=run.pk)
    assert (stored.status, stored.steps, run.status) == ("completed", 3, "completed")
    session = Session.objects.get(pk=run.session_id)
    assert (session.status, session.summary, session.transcript) == ("completed", "all done", transcript)
    assert session.finished is not None and session.error == ""
    assert not Message.objects.filter(session=session, status=Message.Status.CLAIMED).exists()
    seqs = list(Event.objects.filter(session=session).order_by("seq").values_list("seq", "type"))
    assert [s for s, _ in seqs] == list(range(1, len(seqs) + 1))  # gap-free
    assert [t for _, t in seqs[-2:]] == ["run_completed", "status"]


def test_a_message_that_arrives_during_the_run_starts_the_next_one(team, owner, repository):
    run = claimed(team, owner, repository)
    session = Session.objects.get(pk=run.session_id)
    session.add_message("and another thing")  # the run is active: the message waits for it
    assert not Run.objects.filter(session=session, status=Run.Status.QUEUED).exists()

    assert run.finish(Run.Status.COMPLETED)

    follow_up = Run.objects.get(session=session, status=Run.Status.QUEUED)
    assert follow_up.attempt == 2
    assert Session.objects.get(pk=session.pk).status == "queued"


def test_finish_writes_nothing_for_a_run_that_was_cancelled(team, owner, repository):
    run = claimed(team, owner, repository)
    Session.objects.get(pk=run.session_id).cancel()
    events = Event.objects.filter(session_id=run.session_id).count()

    assert not run.finish(
        Run.Status.COMPLETED,
        session_fields={"summary": "too late"},
        events=[("run_completed", {"run_id": run.pk, "summary": "too late"})],
    )

    assert run.status == Run.Status.CANCELLED
    session = Session.objects.get(pk=run.session_id)
    assert session.status == "cancelled" and session.summary == ""
    assert Event.objects.filter(session_id=run.session_id).count() == events


def test_a_failed_run_keeps_its_error_and_cancels_its_messages(team, owner, repository):
    run = claimed(team, owner, repository)

    assert run.finish(Run.Status.FAILED, "boom")

    assert Run.objects.get(pk=run.pk).error == "boom"
    session = Session.objects.get(pk=run.session_id)
    assert (session.status, session.error) == ("failed", "boom")
    assert set(session.messages.values_list("status", flat=True)) == {Message.Status.CANCELLED}


def test_usage_counts_on_the_run_and_the_session_in_one_go(team, owner, repository):
    run = claimed(team, owner, repository)
    run.add_usage(10, 5, 2, Decimal("0.25"))
    run.add_usage(1, 1, 0, Decimal("0.5"))

    stored = Run.objects.get(pk=run.pk)
    session = Session.objects.get(pk=run.session_id)
    for row in (stored, session, run):
        assert (row.input_tokens, row.output_tokens, row.cached_tokens) == (11, 6, 2)
        assert row.cost_usd == Decimal("0.75")


def test_usage_writes_its_model_call_and_the_checkpoint_in_the_same_statement(
    team, owner, repository, django_assert_num_queries
):
    run = claimed(team, owner, repository)
    transcript = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    call = {"provider": "p", "model": "m", "latency_ms": 7, "status_code": 200, "outcome": "ok", "error": ""}
    with django_assert_num_queries(1 if connection.vendor == "postgresql" else 3):
        run.add_usage(10, 5, 2, Decimal("0.25"), Checkpoint(1, None, transcript, 2), call)

    row = LLMCall.objects.get(run=run)
    assert (row.session_id, row.provider, row.model, row.latency_ms, row.status_code) == (
        run.session_id,
        "p",
        "m",
        7,
        200,
    )
    assert (row.input_tokens, row.output_tokens, row.cached_tokens, row.cost_usd) == (
        10,
        5,
        2,
        Decimal("0.25"),
    )
    assert Run.objects.get(pk=run.pk).checkpoint == {"steps": 1, "transcript": transcript, "todos": None}


def test_usage_writes_the_events_after_it_in_its_statement(
    team, owner, repository, django_assert_num_queries
):
    """The reply's usage, LLMCall row and checkpoint, with the step's first events (the usage event
    and tool_started): the session's usage and its event numbers move in one UPDATE of its row."""
    run = claimed(team, owner, repository)
    before = Session.objects.get(pk=run.session_id).last_seq
    call = {"provider": "p", "model": "m", "latency_ms": 7, "status_code": 200, "outcome": "ok", "error": ""}
    events = [("usage", {"input_tokens": 10}), ("tool_started", {"call_id": "c", "name": "bash"})]
    postgres = connection.vendor == "postgresql"  # one statement there, a transaction elsewhere
    with django_assert_num_queries(1) if postgres else contextlib.nullcontext():
        run.add_usage(10, 5, 2, Decimal("0.25"), Checkpoint(1, None, [{"role": "system", "content": "s"}], 1),
                      call, events=events)  # fmt: skip

    session = Session.objects.get(pk=run.session_id)
    stored = Run.objects.get(pk=run.pk)
    for row in (session, stored):
        assert (row.input_tokens, row.output_tokens, row.cached_tokens, row.cost_usd) == (
            10,
            5,
            2,
            Decimal("0.25"),
        )
    assert session.last_seq == before + 2
    written = Event.objects.filter(session_id=run.session_id, seq__gt=before).order_by("seq")
    assert [(e.seq, e.type, e.run_id, e.payload) for e in written] == [
        (before + 1, "usage", run.pk, events[0][1]),
        (before + 2, "tool_started", run.pk, events[1][1]),
    ]
    assert LLMCall.objects.filter(run=run, cost_usd=Decimal("0.25")).count() == 1
    assert stored.checkpoint["steps"] == 1


def test_a_checkpoint_sends_only_the_messages_the_saved_one_lacks(team, owner, repository):
    run = claimed(team, owner, repository)
    transcript = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert run.beat(Checkpoint(1, None, transcript, 2))
    transcript += [
        {"role": "assistant", "content": "a"},
        {"role": "tool", "tool_call_id": "c", "content": "t"},
    ]
    todos = [{"content": "x", "status": "pending"}]
    assert run.beat(Checkpoint(2, todos, transcript, 3, kept=2))  # the last message not yet
    assert Run.objects.get(pk=run.pk).checkpoint == {"steps": 2, "transcript": transcript[:3], "todos": todos}
    assert run.beat(Checkpoint(3, todos, transcript, 4, kept=3))
    assert Run.objects.get(pk=run.pk).checkpoint == {"steps": 3, "transcript": transcript, "todos": todos}
    if connection.vendor == "postgresql":  # a saved one of another length is left alone, not spliced wrong
        assert run.beat(Checkpoint(4, None, transcript + transcript, 8, kept=6))
        assert Run.objects.get(pk=run.pk).checkpoint["steps"] == 3


def test_a_heartbeat_writes_the_steps_held_back_events_in_its_statement(
    team, owner, repository, django_assert_num_queries
):
    run = claimed(team, owner, repository)
    transcript = [{"role": "system", "content": "s"}]
    held = [("tool_finished", {"call_id": "c", "name": "bash", "ok": True, "output": "", "truncated": False})]
    postgres = connection.vendor == "postgresql"  # one statement there, a transaction elsewhere
    with django_assert_num_queries(1) if postgres else contextlib.nullcontext():
        assert run.beat(Checkpoint(1, None, transcript, 1), held)

    event = Event.objects.filter(session_id=run.session_id).order_by("-seq").first()
    assert (event.type, event.run_id, event.payload) == ("tool_finished", run.pk, held[0][1])
    assert Run.objects.get(pk=run.pk).checkpoint == {"steps": 1, "transcript": transcript, "todos": None}
    Run.objects.filter(pk=run.pk).update(status=Run.Status.CANCELLED)
    assert not run.beat(None, [("progress", {"message": "still written"})])  # cancelled: no beat
    assert Event.objects.filter(session_id=run.session_id, type="progress").exists()


def test_the_run_budget_counts_the_runs_own_spend_without_asking_again(
    team, owner, repository, django_assert_num_queries, settings
):
    settings.SESSION_BUDGET_USD = 0
    settings.TEAM_MONTHLY_BUDGET_USD = 0
    run = claimed(team, owner, repository)
    Session.objects.filter(pk=run.session_id).update(budget_usd=Decimal("1"))
    run = Run.objects.select_related("session__team").get(pk=run.pk)
    budget = RunBudget(run)
    with django_assert_num_queries(0):
        assert budget.problem() is None
    run.add_usage(1, 1, 0, Decimal("1"))
    with django_assert_num_queries(0):
        assert "this session has spent $1.0000 of its $1.00 budget" in budget.problem()


def test_resolve_shares_lookups_but_never_answers_from_before_the_call(tmp_path):
    repo = make_git_repo(tmp_path / "repo")

    def head() -> str:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()

    assert repocache.resolve(str(repo), "main") == head()
    assert repocache.resolve(str(repo), "no-such-branch") is None

    results: list[str | None] = []
    lock = threading.Lock()

    def ask() -> None:
        value = repocache.resolve(str(repo), "main")
        with lock:
            results.append(value)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [head()] * 12

    (repo / "new.txt").write_text("new\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=GIT_ENV, check=True)
    subprocess.run(["git", "commit", "-qm", "new"], cwd=repo, env=GIT_ENV, check=True)
    assert repocache.resolve(str(repo), "main") == head()  # a push is seen by the next call


def test_resolve_reads_a_local_branch_from_its_ref_files_as_ls_remote_would(tmp_path, monkeypatch):
    repo = make_git_repo(tmp_path / "repo")

    def git(*args: str, cwd=repo) -> str:
        return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True).stdout

    bare = tmp_path / "bare.git"
    git("clone", "-q", "--bare", str(repo), str(bare), cwd=tmp_path)
    packed = tmp_path / "packed"
    git("clone", "-q", str(repo), str(packed), cwd=tmp_path)
    git("pack-refs", "--all", cwd=packed)
    assert not (packed / ".git" / "refs" / "heads" / "main").exists()
    git("symbolic-ref", "refs/heads/alias", "refs/heads/main")
    git("worktree", "add", "-q", "-b", "side", str(tmp_path / "linked"))
    cases = [(repo, "main"), (bare, "main"), (packed, "main"), (repo, "alias"), (tmp_path / "linked", "side")]
    expected = {
        (path, branch): git("ls-remote", str(path), f"refs/heads/{branch}").split()[0]
        for path, branch in cases
    }

    with monkeypatch.context() as without_git:
        without_git.setenv("PATH", str(tmp_path / "nothing"))  # no git: only the ref files can answer
        for path, branch in cases[:3]:
            assert repocache.resolve(str(path), branch) == expected[path, branch]
        with pytest.raises(FileNotFoundError):  # a symbolic ref is left to git
            repocache.resolve(str(repo), "alias")
    for path, branch in cases[3:]:  # a symbolic ref, a linked work tree: git answers
        assert repocache.resolve(str(path), branch) == expected[path, branch]
    assert repocache.resolve(str(repo), "../repo/main") is None


@pytest.fixture
def handle(settings, tmp_path):
    settings.SANDBOX_ISOLATION = "none"
    provider = LocalProvider(root=tmp_path / "sandboxes")
    from sandboxes.base import SandboxSpec

    return provider.create(SandboxSpec(session_id=1))


def test_put_archive_writes_nothing_when_a_later_member_escapes(handle):
    data = make_tar(
        [("fine.txt", b"ok", None, tarfile.REGTYPE), ("sub/up", None, "../../..", tarfile.SYMTYPE)]
    )
    with pytest.raises(PathEscape):
        handle.put_archive(".", data)
    assert handle.list_files(".") == []


def test_put_archive_refuses_special_files(handle):
    data = make_tar([("fine.txt", b"ok", None, tarfile.REGTYPE), ("fifo", None, "", tarfile.FIFOTYPE)])
    with pytest.raises(SandboxError):
        handle.put_archive(".", data)
    assert handle.list_files(".") == []


def test_put_archive_refuses_writing_through_a_link_already_in_the_workspace(handle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (handle.host_workspace / "out").symlink_to(outside)
    with pytest.raises(PathEscape):
        handle.put_archive(".", make_tar([("out/owned", b"owned", None, tarfile.REGTYPE)]))
    assert not (outside / "owned").exists()


def tree_of(root) -> dict[str, tuple]:
    """Every entry under ``root``: (kind, mode, contents or link target, mtime for files)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[name] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[name] = ("dir",)
        else:
            entries[name] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes(), int(info.st_mtime))
    return entries


@pytest.fixture
def template(run_settings, tmp_path):
    """A repository template (sessions/repocache.py) with an executable, a link and a nested file."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (source / "run.sh").chmod(0o755)
    (source / "docs").mkdir()
    (source / "docs" / "a.md").write_text("a\n")
    repo = make_git_repo(tmp_path / "repo", source=source)
    (repo / "readme").symlink_to("docs/a.md")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=GIT_ENV, check=True)
    subprocess.run(["git", "commit", "-qm", "link"], cwd=repo, env=GIT_ENV, check=True)
    commit = repocache.resolve(str(repo), "main")
    return repocache.template(str(repo), "main", commit), commit


def test_a_local_sandbox_gets_the_same_workspace_as_the_tar_gives_without_sharing_a_file(
    handle, template, tmp_path
):
    path, commit = template
    other = LocalProvider(root=tmp_path / "sandboxes").create(SandboxSpec(session_id=2))
    repocache.upload(handle, path, "deputies/x", commit, "refs/deputies/base")
    other.put_archive(".", repocache.sandbox_tar(path, "deputies/x", commit, "refs/deputies/base"))

    copied, unpacked = tree_of(handle.host_workspace), tree_of(other.host_workspace)
    # The tar writes the session's refs loose as well (over a workspace that may hold loose ones).
    loose = (
        ".git/refs/heads",
        ".git/refs/heads/deputies",
        ".git/refs/heads/deputies/x",
        ".git/refs/deputies",
        ".git/refs/deputies/base",
    )
    refs = (".git/HEAD", ".git/packed-refs")
    assert not any(name in copied for name in loose)  # no directory or file per session: packed
    assert {k: v[:3] for k, v in copied.items()} == {k: v[:3] for k, v in unpacked.items() if k not in loose}
    assert {k: v for k, v in copied.items() if k not in refs} == {
        k: v for k, v in unpacked.items() if k not in refs + loose
    }
    for name in ("deputies/x", "refs/deputies/base", "main", "origin/main"):
        for workspace in (handle.host_workspace, other.host_workspace):
            shown = subprocess.run(
                ["git", "rev-parse", "--verify", name], cwd=workspace, capture_output=True, text=True
            )
            assert shown.stdout.strip() == commit, (name, shown.stderr)
    assert copied["run.sh"][1] == 0o755 and copied["readme"] == ("link", "docs/a.md")
    assert copied[".git/HEAD"][2] == b"ref: refs/heads/deputies/x\n"
    assert not any(name.startswith(".git/logs") for name in copied)
    git_status = subprocess.run(
        ["git", "status", "--porcelain", "--branch"],
        cwd=handle.host_workspace,
        capture_output=True,
        text=True,
    )
    assert git_status.stdout == "## deputies/x\n"
    # A copy, not a link: what a session writes never reaches the template the next one gets.
    for name in ("run.sh", ".git/index", ".git/config"):
        assert (handle.host_workspace / name).stat().st_ino != (path / name).stat().st_ino
    (handle.host_workspace / "docs" / "a.md").write_text("changed by the session\n")
    assert (path / "docs" / "a.md").read_text() == "a\n"


def test_a_template_built_again_at_its_path_is_listed_again(handle, template, tmp_path):
    # The worker lists a template once (copy_tree's listing_key); the reaper may remove it and a
    # later run build it again at the same path, with other files (a file changed by hand here).
    path, commit = template
    repocache.upload(handle, path, "deputies/x", commit, "refs/deputies/base")
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(path, rebuilt, symlinks=True)
    (rebuilt / "docs" / "a.md").unlink()
    (rebuilt / "docs" / "b.md").write_text("b\n")
    shutil.rmtree(path)
    os.rename(rebuilt, path)

    other = LocalProvider(root=tmp_path / "sandboxes").create(SandboxSpec(session_id=2))
    repocache.upload(other, path, "deputies/x", commit, "refs/deputies/base")
    assert (other.host_workspace / "docs" / "b.md").read_text() == "b\n"
    assert not (other.host_workspace / "docs" / "a.md").exists()


def test_a_sandbox_that_is_not_empty_gets_the_checked_tar_instead(handle, template, tmp_path):
    path, commit = template
    outside = tmp_path / "outside"
    outside.mkdir()
    (handle.host_workspace / "docs").symlink_to(outside)  # left by a sandbox whose first run died

    assert handle.copy_tree(path) is False
    assert handle.list_files(".") == ["docs"]
    with pytest.raises(PathEscape):
        repocache.upload(handle, path, "deputies/x", commit, "refs/deputies/base")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "links",
    [{"up": "../outside"}, {"abs": "/etc"}, {"here": ".", "there": "here/.."}],
    ids=["dotdot", "absolute", "chain"],
)
def test_a_template_link_that_leads_out_is_refused_as_the_tar_refuses_it(handle, tmp_path, links):
    source = tmp_path / "template"
    source.mkdir()
    (source / "file").write_text("x")
    for name, target in links.items():
        (source / name).symlink_to(target)

    with pytest.raises(PathEscape):
        handle.copy_tree(source)
    with pytest.raises(PathEscape):
        LocalProvider(root=tmp_path / "sandboxes").create(SandboxSpec(session_id=3)).put_archive(
            ".", repocache.template_tar(source) + b"\0" * 1024
        )


def test_the_minute_job_keeps_the_newest_successful_tasks_only(db):
    from datetime import timedelta

    from django.utils import timezone
    from django_q.models import Failure, Success, Task

    from sessions.tasks import prune_task_results

    now = timezone.now()
    for n in range(5):
        for success in (True, False):
            Task.objects.create(
                id=f"t{n}{success}", name=f"task-{n}-{success}", func="f", started=now,
                stopped=now - timedelta(minutes=n), success=success,
            )  # fmt: skip
    assert prune_task_results(keep=3) == 2
    assert sorted(Success.objects.values_list("name", flat=True)) == [f"task-{n}-True" for n in range(3)]
    assert Failure.objects.count() == 5  # failures are the admin's to clear
    assert prune_task_results(keep=3) == 0 and prune_task_results(keep=10) == 0

"""The repository's ``.deputies/setup``: a real run, a real local sandbox, the scripted model over HTTP."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sandboxes.providers.local import LocalProvider
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Artifact, Environment, Event, LLMCall, Repository, Run, start_session
from sessions.runner import SETUP_FLUSH_CHARS, execute
from tests.conftest import make_git_repo

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "PATH": "/usr/bin:/bin",
}
DONE = {"responses": [{"content": "Nothing to do."}]}


def repo_with_setup(tmp_path: Path, script: str, *, executable: bool = False) -> Path:
    path = make_git_repo(tmp_path / "repo")
    setup = path / ".deputies" / "setup"
    setup.parent.mkdir()
    setup.write_text(script)
    if executable:
        setup.chmod(0o755)
    for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "setup"]):
        subprocess.run(argv, cwd=path, env=GIT_ENV, check=True, capture_output=True)
    return path


def run_session(run_settings, team, owner, repo: Path, script: dict = DONE, environment=None) -> Run:
    repository = Repository.objects.create(team=team, name="r", url=str(repo), provider="local")
    session = start_session(
        team=team,
        repository=repository,
        environment=environment,
        prompt="Go",
        model="scripted/demo",
        created_by=owner,
    )
    with start_in_thread(script) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
    return session.runs.get()


def setup_log(run: Run) -> str:
    artifact = Artifact.objects.get(run=run, kind="log", name__endswith="-setup.log")
    with artifact.file.open("rb") as fh:
        return fh.read().decode()


def types(run: Run) -> list[str]:
    return list(Event.objects.filter(run=run).order_by("seq").values_list("type", flat=True))


def test_it_runs_the_setup_script_before_the_agent(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(
        tmp_path,
        "echo installing deps\necho a warning >&2\ntouch .setup-done\nls calc.py\n",
    )
    run = run_session(run_settings, team, owner, repo)

    assert run.status == Run.Status.COMPLETED, run.error
    seen = types(run)
    assert seen.index("repository_ready") < seen.index("setup_output") < seen.index("setup_finished")
    assert seen.index("setup_finished") < seen.index("assistant_text")
    outputs = [e.payload for e in Event.objects.filter(run=run, type="setup_output").order_by("seq")]
    assert {"stream": "stderr", "text": "a warning\n"} in outputs
    assert "installing deps" in "".join(o["text"] for o in outputs if o["stream"] == "stdout")
    finished = Event.objects.get(run=run, type="setup_finished").payload
    assert finished["exit_code"] == 0 and finished["duration"] >= 0
    log = setup_log(run)
    assert "installing deps" in log and "a warning" in log and "calc.py" in log
    assert LLMCall.objects.filter(run=run).count() == 1


def test_it_runs_an_executable_script_directly(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, '#!/bin/sh\necho "argv0=$0"\n', executable=True)
    run = run_session(run_settings, team, owner, repo)

    assert run.status == Run.Status.COMPLETED, run.error
    assert "argv0=./.deputies/setup" in setup_log(run)


def test_it_coalesces_chatty_output_into_few_events(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, "i=0\nwhile [ $i -lt 5000 ]; do echo line $i; i=$((i+1)); done\n")
    run = run_session(run_settings, team, owner, repo)

    assert run.status == Run.Status.COMPLETED, run.error
    outputs = list(Event.objects.filter(run=run, type="setup_output").values_list("payload", flat=True))
    text = "".join(o["text"] for o in outputs)
    assert text.count("\n") == 5000 and text.endswith("line 4999\n")
    assert len(outputs) <= len(text) // SETUP_FLUSH_CHARS + 20
    assert all(len(o["text"]) <= SETUP_FLUSH_CHARS for o in outputs)


def test_it_fails_the_run_when_setup_fails_and_keeps_the_log(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, "echo cannot find libfoo >&2\nexit 3\n")
    run = run_session(run_settings, team, owner, repo)

    assert run.status == Run.Status.FAILED
    assert "setup script .deputies/setup failed with exit code 3; see the setup log" in run.error
    run.session.refresh_from_db()
    assert run.session.error == run.error
    assert Event.objects.get(run=run, type="setup_finished").payload["exit_code"] == 3
    assert "cannot find libfoo" in setup_log(run)
    assert "assistant_text" not in types(run)
    assert not LLMCall.objects.filter(run=run).exists()


def test_it_fails_the_run_when_setup_times_out(run_settings, team, owner, tmp_path):
    run_settings.SETUP_TIMEOUT = 1
    repo = repo_with_setup(tmp_path, "echo starting\nsleep 30\necho never\n")
    run = run_session(run_settings, team, owner, repo)

    assert run.status == Run.Status.FAILED
    assert "timed out after 1 s" in run.error and "see the setup log" in run.error
    finished = Event.objects.get(run=run, type="setup_finished").payload
    assert finished["timed_out"] is True and finished["duration"] < 10
    log = setup_log(run)
    assert "starting" in log and "never" not in log


def test_it_runs_setup_once_per_sandbox(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, "echo run >> .setup-count\n")
    run = run_session(
        run_settings, team, owner, repo, {"responses": [{"content": "one"}, {"content": "two"}]}
    )
    assert run.status == Run.Status.COMPLETED, run.error
    session = run.session
    session.add_message("again")
    follow_up = session.runs.filter(status=Run.Status.QUEUED).get()
    with start_in_thread({"responses": [{"content": "two"}]}) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(follow_up.pk)
    follow_up.refresh_from_db()

    assert follow_up.status == Run.Status.COMPLETED, follow_up.error
    assert not Event.objects.filter(run=follow_up, type__startswith="setup_").exists()
    sandbox = session.sandboxes.get()
    handle = LocalProvider().connect(sandbox.external_id)
    assert handle.read_file(".setup-count") == b"run\n"


def test_it_skips_setup_when_the_repository_has_none(run_settings, team, owner, sample_repo):
    run = run_session(run_settings, team, owner, sample_repo)

    assert run.status == Run.Status.COMPLETED, run.error
    assert not Event.objects.filter(run=run, type__startswith="setup_").exists()
    assert not Artifact.objects.filter(run=run, kind="log").exists()


def test_it_prepares_the_sandbox_again_after_a_failed_setup(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, "echo broken >&2\nexit 1\n")
    failed = run_session(run_settings, team, owner, repo)
    assert failed.status == Run.Status.FAILED
    sandbox = failed.session.sandboxes.get()
    assert sandbox.status == "ready" and sandbox.prepared is None
    (repo / ".deputies" / "setup").write_text("echo fixed\n")
    subprocess.run(["git", "commit", "-qam", "fix setup"], cwd=repo, env=GIT_ENV, check=True)

    failed.session.add_message("try again")
    follow_up = failed.session.runs.get(status=Run.Status.QUEUED)
    with start_in_thread(DONE) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(follow_up.pk)

    follow_up.refresh_from_db()
    assert follow_up.status == Run.Status.COMPLETED, follow_up.error
    assert "fixed" in setup_log(follow_up)
    sandbox.refresh_from_db()
    assert sandbox.prepared is not None and failed.session.sandboxes.count() == 1


def test_it_runs_the_environments_setup_script_before_the_repositorys(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, 'echo "repo setup sees $(cat .env-was-here)"\n')
    environment = Environment.objects.create(
        team=team, name="env", setup_script="echo from the environment > .env-was-here\necho env setup\n"
    )
    run = run_session(run_settings, team, owner, repo, environment=environment)

    assert run.status == Run.Status.COMPLETED, run.error
    finished = [e.payload for e in Event.objects.filter(run=run, type="setup_finished").order_by("seq")]
    assert [f["script"] for f in finished] == [
        "environment setup script",
        "repository setup script .deputies/setup",
    ]
    log = setup_log(run)
    assert log.index("env setup") < log.index("repo setup sees from the environment")


def test_a_failing_environment_setup_script_stops_before_the_repositorys(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, "echo repo setup ran\n")
    environment = Environment.objects.create(
        team=team, name="env", setup_script="echo no apt here >&2\nexit 7\n"
    )
    run = run_session(run_settings, team, owner, repo, environment=environment)

    assert run.status == Run.Status.FAILED
    assert run.error == "environment setup script failed with exit code 7; see the setup log"
    assert "no apt here" in setup_log(run) and "repo setup ran" not in setup_log(run)

"""Sandbox-visible secrets reach only the process environment of an isolated sandbox's commands (or
an unisolated one the operator explicitly accepted): never a file on the worker's disk, never another
session's sandbox. Real runs (local provider, the scripted model over HTTP) and real bubblewrap."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from django.db import connection

from sandboxes.base import Cancel, SandboxSpec
from sandboxes.models import Sandbox
from sandboxes.providers.local import LocalProvider
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Environment, Event, Run
from sessions.runner import execute
from sessions.web.setup_checks import check_sandbox
from tests.live import database_url_for_children
from tests.sandbox_contract import live_processes_with, shell, unique_sleep, wait_until
from tests.test_pages import browser, page_of
from tests.test_setup_script import repo_with_setup, run_session


def canary() -> str:
    return "canary-" + secrets.token_hex(12)


def bash(command: str) -> dict:
    return {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}


FINISH = {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}
SHOW_TOKEN = 'echo "t=${API_TOKEN:-unset}"'


def files_holding(value: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` whose bytes contain ``value`` (symlinks not followed)."""
    needle = value.encode()
    found = []
    for root in roots:
        for top, _dirs, files in os.walk(root):
            for name in files:
                path = Path(top) / name
                if path.is_symlink() or not path.is_file():
                    continue
                if needle in path.read_bytes():
                    found.append(str(path))
    return found


def environment_with(team, value: str) -> Environment:
    environment = Environment.objects.create(team=team, name="env", env_vars={"PLAIN": "plain-value"})
    environment.change_secrets(
        {
            "API_TOKEN": {"value": value, "sandbox_visible": True},
            "HIDDEN_TOKEN": {"value": canary(), "sandbox_visible": False},
        }
    )
    return environment


def bash_outputs(run: Run) -> list[str]:
    return [e.payload["output"] for e in Event.objects.filter(run=run, type="tool_finished").order_by("seq")]


def sandbox_ready(run: Run) -> dict:
    return Event.objects.get(run=run, type="sandbox_ready").payload


@pytest.fixture
def host_without_bwrap(monkeypatch, tmp_path):
    """A worker host where bubblewrap is not installed: PATH holds git and sh, nothing else."""
    bin_dir = tmp_path / "bin-without-bwrap"
    bin_dir.mkdir()
    for program in ("git", "sh"):
        os.symlink(shutil.which(program), bin_dir / program)
    monkeypatch.setenv("PATH", str(bin_dir))


def database_dump() -> str:
    """pg_dump of the test database (what a backup would hold); "" on SQLite."""
    if connection.vendor != "postgresql":
        return ""
    return subprocess.run(
        ["pg_dump", "--no-owner", database_url_for_children()], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.django_db(transaction=True)  # committed, so pg_dump sees the run's rows
def test_it_keeps_secret_values_out_of_every_file_after_a_run_and_a_reconnect(
    run_settings, team, owner, tmp_path
):
    value = canary()
    environment = environment_with(team, value)
    repo = repo_with_setup(tmp_path, "true\n")
    script = {"responses": [bash(SHOW_TOKEN), FINISH, bash(SHOW_TOKEN), FINISH]}
    first = run_session(run_settings, team, owner, repo, {"responses": script["responses"][:2]}, environment)
    assert first.status == Run.Status.COMPLETED, first.error
    assert "t=[secret API_TOKEN]" in bash_outputs(first)[0]  # the sandbox had it (redacted on the way out)
    roots = [Path(run_settings.SANDBOX_ROOT), Path(run_settings.DATA_DIR), Path(run_settings.MEDIA_ROOT)]
    assert files_holding(value, *roots) == []

    # A follow-up reconnects to the same live sandbox: the value comes back from the encrypted row.
    session = first.session
    session.add_message("Again")
    follow_up = session.runs.get(attempt=2)
    with start_in_thread(script) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(follow_up.pk)
    follow_up.refresh_from_db()
    assert follow_up.status == Run.Status.COMPLETED, follow_up.error
    assert session.sandboxes.count() == 1  # reconnected, not recreated
    assert "t=[secret API_TOKEN]" in bash_outputs(follow_up)[0]
    assert files_holding(value, *roots) == []
    dump = database_dump()
    assert connection.vendor != "postgresql" or "t=[secret API_TOKEN]" in dump  # the dump has the events...
    assert value not in dump  # ...and no value: the secret rows are ciphertext


def test_it_withholds_secrets_from_a_sandbox_that_fell_back_to_no_isolation(
    run_settings, team, owner, tmp_path, host_without_bwrap
):
    run_settings.SANDBOX_ISOLATION = "auto"  # bubblewrap is missing, so: no isolation
    environment = environment_with(team, canary())
    repo = repo_with_setup(tmp_path, "true\n")
    run = run_session(
        run_settings,
        team,
        owner,
        repo,
        {"responses": [bash(SHOW_TOKEN + '; echo "p=$PLAIN"'), FINISH]},
        environment,
    )
    assert run.status == Run.Status.COMPLETED, run.error  # the run still runs...
    assert "t=unset\np=plain-value" in bash_outputs(run)[0]  # ...without the secret, with the plain variable
    ready = sandbox_ready(run)
    assert ready["isolated"] is False
    assert ready["secrets_withheld"] == ["API_TOKEN"]  # names only, and only the sandbox-visible ones
    assert "not isolated" in ready["secrets_withheld_reason"]
    assert "DEPUTIES_SANDBOX_ISOLATION=none" in ready["secrets_withheld_reason"]
    page = browser(owner).get(page_of(run.session)).content.decode()
    assert "Secrets withheld</strong> (API_TOKEN)" in page


def test_it_gives_secrets_to_an_unisolated_sandbox_when_the_operator_opted_in(
    run_settings, team, owner, tmp_path
):
    assert run_settings.SANDBOX_ISOLATION == "none"  # set explicitly: the single-user trial mode
    environment = environment_with(team, canary())
    repo = repo_with_setup(tmp_path, "true\n")
    run = run_session(run_settings, team, owner, repo, {"responses": [bash(SHOW_TOKEN), FINISH]}, environment)
    assert run.status == Run.Status.COMPLETED, run.error
    assert "t=[secret API_TOKEN]" in bash_outputs(run)[0]
    ready = sandbox_ready(run)
    assert ready["isolated"] is False and "secrets_withheld" not in ready


def test_it_gives_secrets_to_a_bubblewrap_sandbox(run_settings, team, owner, tmp_path):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed here; CI installs it")
    run_settings.SANDBOX_ISOLATION = "auto"
    environment = environment_with(team, canary())
    repo = repo_with_setup(tmp_path, "true\n")
    run = run_session(run_settings, team, owner, repo, {"responses": [bash(SHOW_TOKEN), FINISH]}, environment)
    assert run.status == Run.Status.COMPLETED, run.error
    assert "t=[secret API_TOKEN]" in bash_outputs(run)[0]
    ready = sandbox_ready(run)
    assert ready["isolated"] is True and "secrets_withheld" not in ready
    assert Sandbox.objects.get(session=run.session).isolated


def test_the_setup_page_says_when_secrets_are_withheld_and_how_to_fix_it(
    settings, tmp_path, host_without_bwrap
):
    settings.SANDBOX_PROVIDER = "local"
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "auto"
    check = check_sandbox()
    assert check.status == "warn"
    assert "secrets are withheld" in check.summary
    assert "DEPUTIES_SANDBOX_ISOLATION=none" in check.fix and "bubblewrap" in check.fix
    assert ("Environment secrets", "withheld (not isolated)") in check.details

    settings.SANDBOX_ISOLATION = "none"
    check = check_sandbox()
    assert check.status == "warn"
    assert "secrets are given to unisolated sandboxes" in check.summary
    assert (
        "Environment secrets",
        "given, without isolation (DEPUTIES_SANDBOX_ISOLATION=none)",
    ) in check.details


def test_a_bubblewrap_sandbox_cannot_see_other_sessions_or_the_data_dir(settings, tmp_path):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed here; CI installs it")
    settings.SANDBOX_ISOLATION = "bwrap"
    # Outside /tmp (bubblewrap gives every sandbox its own /tmp, which would hide anything there).
    data_dir = Path(settings.BASE_DIR) / "var" / f"test-isolation-{secrets.token_hex(4)}"
    settings.DATA_DIR = data_dir
    settings.SANDBOX_ROOT = data_dir / "sandboxes"
    try:
        provider = LocalProvider()
        value = canary()
        theirs = provider.create(SandboxSpec(session_id=2, env={"API_TOKEN": value}))
        theirs.write_file("private.txt", value.encode())
        mine = provider.create(SandboxSpec(session_id=1))
        marker = unique_sleep()
        stop = Cancel()
        running = threading.Thread(
            target=shell, args=(theirs, f"sleep {marker}"), kwargs={"timeout": 60, "cancel": stop}
        )
        running.start()
        try:
            wait_until(lambda: live_processes_with(marker), timeout=10, message="the other session's command")
            their_dir = Path(settings.SANDBOX_ROOT) / theirs.id
            for path in (data_dir, settings.SANDBOX_ROOT, their_dir, their_dir / "workspace" / "private.txt"):
                assert shell(mine, f"test -e '{path}'").exit_code != 0, f"{path} is visible"
            looked = shell(mine, "cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'; ls /proc")
            assert value not in looked.stdout and marker not in looked.stdout
        finally:
            stop.set()
            running.join()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

"""Cancel in flight: a cancel kills the run's running command within 2 s, on every provider.

Real runs: the scripted model over HTTP asks for a long ``sleep``; the session is cancelled through
the REST API (or ``Session.cancel``) while it runs; the command's processes must be gone within the
deadline, the run must end cancelled, and the timeline must say the command was cancelled.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from django.db import connection

from sandboxes.models import Sandbox
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Environment, Event, Run, Session, start_session
from sessions.runner import execute
from tests.conftest import client_for
from tests.live import child_env, wait_for, worker_process
from tests.sandbox_contract import live_processes_with, unique_sleep

pytestmark = pytest.mark.django_db(transaction=True)

DEADLINE = 2.0


def script(marker: str) -> dict:
    return {
        "responses": [
            {"tool_calls": [{"name": "bash", "arguments": {"command": f"echo started; sleep {marker}"}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "should never get here"}}]},
        ]
    }


def in_thread(run_id: int) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []

    def work() -> None:
        try:
            outcome.append(execute(run_id))
        finally:
            connection.close()

    thread = threading.Thread(target=work, name=f"test-run-{run_id}")
    thread.start()
    return thread, outcome


def cancel_and_time(session: Session, marker: str, via_api_as=None) -> float:
    """Cancel once the command runs; seconds until its last process is gone."""
    wait_for(lambda: live_processes_with(marker), timeout=60, what="the sleep to start")
    started = time.monotonic()
    if via_api_as is not None:
        response = client_for(via_api_as).post(f"/api/v1/sessions/{session.pk}/cancel/")
        assert response.status_code == 200, response.content
    else:
        Session.objects.get(pk=session.pk).cancel()
    wait_for(
        lambda: not live_processes_with(marker), timeout=10, interval=0.02, what="the sleep to be killed"
    )
    return time.monotonic() - started


def assert_cancelled_in_the_timeline(run: Run, fake) -> None:
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    finished = Event.objects.get(run=run, type="tool_finished")
    assert finished.payload["ok"] is False
    assert "[cancelled: the run was cancelled" in finished.payload["output"]
    assert "started" in finished.payload["output"]
    assert len([r for r in fake.requests if r["path"].endswith("/chat/completions")]) == 1  # no step after it


@pytest.fixture
def local_settings(run_settings):
    run_settings.CANCEL_POLL = 0.5  # the default, spelled out: the deadline must hold with it
    return run_settings


@pytest.mark.parametrize("isolation", ["none", "bwrap"])
def test_it_kills_a_running_command_within_two_seconds_of_a_cancel(
    local_settings, team, owner, repository, isolation
):
    if isolation == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed here; CI installs it")
    local_settings.SANDBOX_ISOLATION = isolation
    marker = unique_sleep()
    with start_in_thread(script(marker)) as fake:
        local_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        session = start_session(
            team=team, repository=repository, prompt="Wait", model="scripted/demo", created_by=owner
        )
        run = session.runs.get()
        thread, outcome = in_thread(run.pk)
        try:
            took = cancel_and_time(session, marker, via_api_as=owner)
        finally:
            thread.join(timeout=30)
        assert took < DEADLINE, f"the command outlived the cancel by {took:.2f} s"
        assert outcome == ["cancelled"]
        assert_cancelled_in_the_timeline(run, fake)
    assert Sandbox.objects.get(session=session).isolated is (isolation == "bwrap")


def test_it_kills_a_running_setup_script_within_two_seconds_of_a_cancel(
    local_settings, team, owner, repository
):
    marker = unique_sleep()
    environment = Environment.objects.create(
        team=team, name="slow", setup_script=f"echo installing; sleep {marker}"
    )
    with start_in_thread(script(marker)) as fake:
        local_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        session = start_session(
            team=team,
            repository=repository,
            environment=environment,
            prompt="Wait",
            model="scripted/demo",
            created_by=owner,
        )
        run = session.runs.get()
        thread, outcome = in_thread(run.pk)
        try:
            took = cancel_and_time(session, marker)
        finally:
            thread.join(timeout=30)
        assert took < DEADLINE, f"the setup script outlived the cancel by {took:.2f} s"
        assert outcome == ["cancelled"]
        run.refresh_from_db()
        assert run.status == Run.Status.CANCELLED
        finished = Event.objects.get(run=run, type="setup_finished").payload
        assert finished["exit_code"] == 137 and not finished["timed_out"]
        assert not fake.requests  # the agent never started


def test_it_kills_a_running_command_in_a_docker_sandbox_within_two_seconds(
    local_settings, team, owner, repository
):
    from sandboxes.providers.docker import DockerProvider
    from tests.test_sandbox_docker import DEPLOYMENT, IMAGE, require_engine

    require_engine()
    local_settings.DOCKER_IMAGE = IMAGE
    local_settings.DOCKER_DEPLOYMENT = DEPLOYMENT
    environment = Environment.objects.create(
        team=team, name="busybox", image=IMAGE, sandbox_provider="docker"
    )
    marker = unique_sleep()
    with start_in_thread(script(marker)) as fake:
        local_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        session = start_session(
            team=team,
            repository=repository,
            environment=environment,
            prompt="Wait",
            model="scripted/demo",
            created_by=owner,
        )
        run = session.runs.get()
        thread, outcome = in_thread(run.pk)
        try:
            took = cancel_and_time(session, marker)
        finally:
            thread.join(timeout=60)
            for sandbox_id in Sandbox.objects.filter(session=session).values_list("external_id", flat=True):
                if sandbox_id:
                    DockerProvider().destroy(sandbox_id)
        assert took < DEADLINE, f"the command outlived the cancel by {took:.2f} s"
        assert outcome == ["cancelled"]
        assert_cancelled_in_the_timeline(run, fake)


@pytest.mark.e2e
def test_a_worker_process_kills_the_command_of_a_session_cancelled_through_the_api(
    settings, tmp_path, team, owner, repository
):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"
    marker = unique_sleep()
    with start_in_thread(script(marker)) as fake:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="k",
        )
        with worker_process(env):
            session = start_session(
                team=team, repository=repository, prompt="Wait", model="scripted/demo", created_by=owner
            )
            took = cancel_and_time(session, marker, via_api_as=owner)
            run = session.runs.get()
            wait_for(
                lambda: Event.objects.filter(run=run, type="tool_finished").exists(),
                timeout=10,
                what="the cancelled command's tool_finished",
            )
        assert took < DEADLINE, f"the command outlived the cancel by {took:.2f} s"
        assert_cancelled_in_the_timeline(run, fake)

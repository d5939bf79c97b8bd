"""The admin's "Open logs" page: the sandbox row, the provider's own view of it, and what ran in it.

Sandboxes are real (the local provider on disk; the docker provider on Docker Engine and on Podman
when their hosts are set, see tests/test_sandbox_docker.py); events come from the real runner steps
and the real agent tool path, so the page is checked against the payloads runs actually write.
"""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from sandboxes.base import get_provider
from sandboxes.models import Sandbox
from sessions.agent.llm import ToolCall
from sessions.agent.loop import _Agent
from sessions.models import Artifact, Session, start_session
from sessions.runner import SETUP_SCRIPT, Runner
from tests.test_sandbox_docker import DEPLOYMENT, IMAGE, engine, remove_leftovers, require_engine  # noqa: F401

SETUP = b"echo 'installing <deps>'\necho 'a warning' >&2\necho done\n"


@pytest.fixture(autouse=True)
def local_settings(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.DATA_DIR = tmp_path / "data"
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "none"
    settings.SANDBOX_PROVIDER = "local"
    return settings


def login(username: str, *, staff: bool, view: bool, django_user_model) -> Client:
    """A browser-like client that logged in through the admin's own login form."""
    user = django_user_model.objects.create_user(username, f"{username}@example.com", "pw", is_staff=staff)
    if view:
        user.user_permissions.add(Permission.objects.get(codename="view_sandbox"))
    client = Client()
    response = client.post(
        reverse("admin:login"), {"username": username, "password": "pw", "next": "/admin/"}
    )
    if staff:
        assert response.status_code == 302, "the staff login failed"
    return client


@pytest.fixture
def operator(db, django_user_model) -> Client:
    return login("operator", staff=True, view=True, django_user_model=django_user_model)


@pytest.fixture
def session(team, owner, repository) -> Session:
    return start_session(
        team=team, repository=repository, prompt="Fix it", model="scripted/demo", created_by=owner
    )


def logs_url(sandbox: Sandbox) -> str:
    return reverse("admin:sandboxes_sandbox_logs", args=[sandbox.pk])


def run_in_sandbox(session: Session) -> tuple[Runner, Sandbox]:
    """The runner's real steps: provision a sandbox, run a setup script, then two agent tool calls."""
    runner = Runner(session.runs.get())
    runner.provision_sandbox()
    script = runner.checkout_dir() / SETUP_SCRIPT
    script.parent.mkdir(parents=True)
    script.write_bytes(SETUP)
    runner.handle.write_file(SETUP_SCRIPT, SETUP)
    runner.run_setup_script()
    agent = _Agent(runner.run, runner.handle, None, [])
    command = "echo '<script>alert(1)</script>'; echo sad >&2; exit 3"
    agent.run_tool(ToolCall("call-1", "bash", json.dumps({"command": command})))
    agent.run_tool(ToolCall("call-2", "list_files", json.dumps({"path": "."})))
    runner.sandbox.refresh_from_db()
    return runner, runner.sandbox


def text_of(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.content.decode()


# --- access -----------------------------------------------------------------------------------


def test_it_sends_anonymous_and_non_staff_users_to_the_login(session, django_user_model):
    sandbox = Sandbox.objects.create(session=session, provider="local", external_id="s1-00000000")
    for client in (Client(), login("member", staff=False, view=True, django_user_model=django_user_model)):
        response = client.get(logs_url(sandbox))
        assert response.status_code == 302
        assert response.url.startswith(reverse("admin:login"))


def test_it_forbids_staff_without_the_view_permission(session, django_user_model):
    sandbox = Sandbox.objects.create(session=session, provider="local", external_id="s1-00000000")
    client = login("helper", staff=True, view=False, django_user_model=django_user_model)
    assert client.get(logs_url(sandbox)).status_code == 403


# --- the local provider -----------------------------------------------------------------------


def test_it_shows_a_local_sandbox_and_what_ran_in_it(operator, session):
    runner, sandbox = run_in_sandbox(session)
    runner.handle.write_file("big.txt", b"x" * 5000)
    page = text_of(operator.get(logs_url(sandbox)))
    # the row
    assert sandbox.external_id in page and "ready" in page
    assert "isolation is switched off" in page
    # the provider's view: the workspace on disk, and no engine logs
    workspace = get_provider("local").root / sandbox.external_id / "workspace"
    assert str(workspace) in page
    assert "5,0" in page and "files" in page  # the size counts big.txt
    assert "keeps no logs of its own" in page
    # the setup script, its output coalesced into one step, with its exit code and its log artifact
    assert "repository setup script" in page
    assert "installing &lt;deps&gt;" in page
    assert '<pre class="output stderr" title="stderr">a warning' in page
    assert page.count("installing &lt;deps&gt;") == 1
    log = Artifact.objects.get(session=session, kind="log")
    assert log.name in page
    assert reverse("admin:agent_sessions_artifact_change", args=[log.pk]) in page
    assert reverse("api-artifact-download", args=[log.pk]) in page
    # the bash command with its output and exit code, escaped; other tools are not commands
    assert "$ echo &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in page
    assert "sad" in page and "exit 3" in page
    assert "<script>alert(1)" not in page
    assert "list_files" not in page


def test_it_says_when_a_local_workspace_is_gone(operator, session):
    runner, sandbox = run_in_sandbox(session)
    get_provider("local").destroy(sandbox.external_id)
    page = text_of(operator.get(logs_url(sandbox)))
    assert "Missing:" in page and "does not exist on this host" in page
    assert "exit 3" in page  # the events outlive the sandbox


def test_it_keeps_to_its_own_sandbox_when_the_session_had_several(operator, session):
    runner, first = run_in_sandbox(session)
    Sandbox.objects.filter(pk=first.pk).update(status=Sandbox.Status.DESTROYED)
    later = Runner(session.runs.get())
    later.provision_sandbox()
    _Agent(later.run, later.handle, None, []).run_tool(
        ToolCall("call-9", "bash", json.dumps({"command": "echo only-in-the-second"}))
    )
    assert "only-in-the-second" not in text_of(operator.get(logs_url(first)))
    second = text_of(operator.get(logs_url(later.sandbox)))
    assert "only-in-the-second" in second and "exit 3" not in second


def test_it_says_when_the_provider_never_made_the_sandbox(operator, session):
    sandbox = Sandbox.objects.create(
        session=session, provider="docker", status=Sandbox.Status.FAILED, error="image <gone>"
    )
    run_in_sandbox(session)  # the next run's sandbox, and what ran there, are not this one's
    page = text_of(operator.get(logs_url(sandbox)))
    assert "never returned a sandbox id" in page
    assert "image &lt;gone&gt;" in page
    assert "No commands are recorded for this sandbox." in page and "exit 3" not in page


def test_it_shows_an_engine_that_does_not_answer(operator, session, settings, tmp_path):
    settings.DOCKER_HOST = f"unix://{tmp_path}/nothing.sock"
    sandbox = Sandbox.objects.create(
        session=session, provider="docker", external_id="deputies-s1-0123456789ab"
    )
    page = text_of(operator.get(logs_url(sandbox)))
    assert "Could not ask the provider" in page and "nothing.sock" in page


# --- how operators get there ------------------------------------------------------------------


def test_it_opens_the_logs_of_the_one_selected_sandbox(operator, session):
    sandbox = Sandbox.objects.create(session=session, provider="local", external_id="s1-00000000")
    response = operator.post(
        reverse("admin:sandboxes_sandbox_changelist"),
        {"action": "open_logs", "_selected_action": [sandbox.pk]},
    )
    assert response.status_code == 302 and response.url == logs_url(sandbox)


def test_it_asks_for_one_sandbox_when_several_are_selected(operator, session):
    sandboxes = [
        Sandbox.objects.create(session=session, provider="local", external_id=f"s1-0000000{i}")
        for i in range(2)
    ]
    changelist = reverse("admin:sandboxes_sandbox_changelist")
    response = operator.post(
        changelist, {"action": "open_logs", "_selected_action": [s.pk for s in sandboxes]}
    )
    assert response.status_code == 302 and response.url == changelist
    assert [str(m) for m in get_messages(response.wsgi_request)] == [
        "Select exactly one sandbox to open its logs."
    ]


def test_it_links_the_logs_from_the_change_list_and_the_change_page(operator, session):
    sandbox = Sandbox.objects.create(session=session, provider="local", external_id="s1-00000000")
    url = logs_url(sandbox)
    assert f'href="{url}"' in text_of(operator.get(reverse("admin:sandboxes_sandbox_changelist")))
    change = text_of(operator.get(reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk])))
    assert f'href="{url}"' in change and "Open logs" in change


# --- the docker provider (Docker Engine, and Podman when DEPUTIES_TEST_PODMAN_HOST is set) --------


@pytest.fixture
def docker_session(session, settings, engine):  # noqa: F811 (the imported fixture)
    require_engine(engine)
    settings.SANDBOX_PROVIDER = "docker"
    settings.DOCKER_IMAGE = IMAGE
    settings.DOCKER_DEPLOYMENT = DEPLOYMENT
    settings.DOCKER_HOST = engine.host
    yield session
    for sandbox in Sandbox.objects.filter(session=session).exclude(external_id=""):
        get_provider("docker").destroy(sandbox.external_id)


def test_it_shows_the_container_state_and_its_log(operator, docker_session):
    runner, sandbox = run_in_sandbox(docker_session)
    # Commands run through exec, whose output is not the container's; PID 1's streams are.
    wrote = runner.handle.exec(
        ["sh", "-c", "echo 'to <pid1> out' >/proc/1/fd/1; echo to-pid1-err >/proc/1/fd/2"]
    )
    assert wrote.exit_code == 0, wrote.stderr
    page = text_of(operator.get(logs_url(sandbox)))
    assert "container running" in page
    for fact in ("exit code", "OOM killed", "restart count", "started"):
        assert f"<th>{fact}</th>" in page
    assert "<th>finished</th><td>not finished</td>" in page
    assert '<span class="stdout">' in page and "to &lt;pid1&gt; out" in page
    assert '<span class="stderr">' in page and "to-pid1-err" in page
    assert "exit 3" in page and "installing &lt;deps&gt;" in page
    shorter = text_of(operator.get(logs_url(sandbox) + "?tail=1"))
    assert shorter.count('<span class="std') == 1 and "Showing up to 1 lines" in shorter


def test_it_shows_a_removed_container_as_missing(operator, docker_session):
    runner, sandbox = run_in_sandbox(docker_session)
    get_provider("docker").destroy(sandbox.external_id)
    page = text_of(operator.get(logs_url(sandbox)))
    assert "Missing:" in page
    assert f"the container {sandbox.external_id} does not exist" in page
    assert "nor does its workspace volume" in page
    assert "exit 3" in page

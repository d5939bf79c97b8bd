"""The control-plane image runs: Simple mode (``deputies up``) in a container made from it answers its
probes, renders the login page, logs the admin in, runs the demo session through its own worker, and
does all of that as a non-root user.

Needs an engine at ``DOCKER_HOST`` and the image ``deputies/control-plane:dev`` (or the one
``DEPUTIES_TEST_CONTROL_IMAGE`` names), which ``scripts/build-image.sh`` makes. Without them these
tests skip, naming the commands to run; with ``CI=true`` they fail instead, because CI builds the
image and must not silently test less. One container serves the whole module (per xdist worker).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import docker.errors
import httpx
import pytest
from docker.models.containers import Container

IMAGE = os.environ.get("DEPUTIES_TEST_CONTROL_IMAGE", "deputies/control-plane:dev")
BUILD = 'engine_env=$(scripts/docker-engine.sh) && eval "$engine_env" && scripts/build-image.sh'
# Containers this module started carry this label (value: the test process), so a leftover is findable.
LABEL = "org.deputies.test-image"
START_TIMEOUT = 120.0
SESSION_TIMEOUT = 120.0
POLL = 0.2
TERMINAL = {"completed", "failed", "cancelled", "archived", "idle"}

pytestmark = pytest.mark.e2e


@dataclass
class App:
    container: Container
    url: str

    def exec(self, *argv: str) -> str:
        """Runs argv in the container (as the image's user) and returns its stdout."""
        result = self.container.exec_run(list(argv), demux=True)
        stdout, stderr = result.output
        if result.exit_code != 0:
            raise AssertionError(f"{argv} exited {result.exit_code}: {(stderr or b'').decode()}")
        return (stdout or b"").decode()


def require_image() -> docker.DockerClient:
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        client.images.get(IMAGE)
        return client
    except docker.errors.ImageNotFound:
        problem = f"the image {IMAGE} is not on the engine at {where}"
    except Exception as exc:
        problem = f"no Docker engine answers at {where} ({type(exc).__name__})"
    message = f"{problem}; build it with: {BUILD}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires the image tests to run, but {message}", pytrace=False)
    pytest.skip(message)


def log_tail(container: Container, lines: int = 40) -> str:
    return container.logs(tail=lines).decode(errors="replace")


def wait_until_healthy(container: Container, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        container.reload()
        if container.status not in ("created", "running"):
            pytest.fail(
                f"the container {container.status} before /healthz answered; its log:\n{log_tail(container)}",
                pytrace=False,
            )
        try:
            response = httpx.get(f"{url}/healthz", timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(POLL)
    pytest.fail(
        f"{url}/healthz did not answer 200 within {START_TIMEOUT:.0f}s ({last}); the container's log:\n"
        f"{log_tail(container)}",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    client = require_image()
    container = client.containers.run(
        IMAGE,
        ["deputies", "up", "--host", "0.0.0.0", "--port", "8000"],
        detach=True,
        # A free port on the loopback only: parallel runs never collide and nothing is exposed.
        ports={"8000/tcp": ("127.0.0.1", None)},
        labels={LABEL: str(os.getpid())},
    )
    try:
        container.reload()
        port = container.ports["8000/tcp"][0]["HostPort"]
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(container, url)
        yield App(container, url)
    finally:
        container.remove(force=True, v=True)  # v: the anonymous /data volume goes too


def test_it_answers_its_probes(app):
    health = httpx.get(f"{app.url}/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = httpx.get(f"{app.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["database"] == {"status": "ok"}


def test_it_renders_the_login_page_with_its_stylesheet(app):
    page = httpx.get(f"{app.url}/login", timeout=10)
    assert page.status_code == 200
    assert 'name="username"' in page.text
    assert 'name="password"' in page.text
    assert "csrfmiddlewaretoken" in page.text
    stylesheet = re.search(r'<link rel="stylesheet" href="([^"]+)"', page.text)
    assert stylesheet, "the login page links no stylesheet"
    css = httpx.get(f"{app.url}{stylesheet.group(1)}", timeout=10)
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


def test_it_logs_the_admin_in_with_the_printed_password(app):
    password = app.exec("cat", "/data/initial_admin_password").strip()
    assert f"password {password!r}" in app.container.logs().decode(errors="replace")
    with httpx.Client(base_url=app.url, timeout=10) as browser:
        form = browser.get("/login")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
        login = browser.post(
            "/login",
            data={"csrfmiddlewaretoken": token, "username": "admin", "password": password, "next": "/"},
        )
        assert login.status_code == 302, login.text
        assert login.headers["location"] == "/"
        home = browser.get("/")
        assert home.status_code == 200
        assert "logout" in home.text.lower()


def test_it_runs_the_demo_session_through_its_own_worker(app):
    token = app.exec("deputies", "token", "create", "admin").strip()
    with httpx.Client(base_url=app.url, timeout=10, headers={"Authorization": f"Bearer {token}"}) as api:
        repositories = api.get("/api/v1/repositories").json()["results"]
        sample = next(r for r in repositories if r["name"] == "sample-repo")
        created = api.post(
            "/api/v1/sessions",
            json={"repository": sample["id"], "prompt": "Make the failing test pass"},
        )
        assert created.status_code == 201, created.text
        session_id = created.json()["id"]
        deadline = time.monotonic() + SESSION_TIMEOUT
        session = created.json()
        while session["status"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(POLL)
            session = api.get(f"/api/v1/sessions/{session_id}").json()
        events = api.get(f"/api/v1/sessions/{session_id}/events").json()["events"]
    assert session["status"] == "completed", (
        f"session ended {session['status']!r}: {session['error']}\n"
        f"{json.dumps(events[-5:], indent=1)}\n{log_tail(app.container)}"
    )
    types = [event["type"] for event in events]
    assert "sandbox_ready" in types
    assert "run_completed" in types


def test_it_runs_as_a_non_root_user(app):
    assert app.container.attrs["Config"]["User"] == "deputies"
    assert app.exec("id", "-u").strip() != "0"
    # Every process in the container, the web server and the worker included.
    uids = app.exec("sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null | grep '^Uid:'")
    real_uids = {line.split()[1] for line in uids.splitlines()}
    assert real_uids and "0" not in real_uids, uids

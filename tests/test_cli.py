"""The `deputies` command as a user runs it: real subprocesses, real exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sessions.agent.fake_llm import start_in_thread
from sessions.models import Artifact, Session
from tests.live import ROOT, child_env, free_port, wait_for, web_process, worker_process

DEPUTIES = str(Path(sys.executable).parent / "deputies")
SCRIPT = json.loads((ROOT / "deputies" / "demo" / "script.json").read_text())


def deputies(
    *args: str, env: dict[str, str], timeout: float = 120, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DEPUTIES, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.django_db(transaction=True)
def test_it_runs_a_prompt_on_a_local_repository_and_exits_zero(tmp_path, owner, sample_repo):
    with start_in_thread(SCRIPT) as fake:
        env = child_env(
            tmp_path,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_DEFAULT_MODEL="scripted/demo",
        )
        result = deputies(
            "run", "--user", owner.username, "--repo", str(sample_repo), "Make the test pass", env=env
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "completed: Fixed add()" in result.stdout
    assert "-> edit_file" in result.stdout
    session = Session.objects.get()
    assert session.status == "completed" and session.source == "cli"
    assert Artifact.objects.filter(session=session, kind="diff").exists()


@pytest.mark.django_db(transaction=True)
def test_it_exits_non_zero_when_the_run_fails(tmp_path, owner, sample_repo):
    script = {"responses": [{"faults": [{"status": 400}]}]}
    with start_in_thread(script) as fake:
        env = child_env(
            tmp_path, DEPUTIES_LLM_PROVIDERS="scripted", DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url
        )
        result = deputies(
            "run",
            "--user",
            owner.username,
            "--model",
            "scripted/demo",
            "--repo",
            str(sample_repo),
            "x",
            env=env,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stdout
    assert Session.objects.get().status == "failed"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("args", "extra_env", "message"),
    [
        (["run", "--repo", "/nonexistent", "x"], {}, "/nonexistent is not under a local repository root"),
        (["run", "--repo", "/etc", "x"], {}, "--repo /etc: /etc is not under a local repository root"),
        (["run", "--repo", "REPO/..", "x"], {}, "is not a git repository"),
        (
            ["run", "--repo", "REPO", "x"],
            {"DEPUTIES_ALLOW_LOCAL_REPOSITORIES": "false"},
            "DEPUTIES_ALLOW_LOCAL_REPOSITORIES is off",
        ),
        (["run", "--repo", "REPO", "--model", "nope/m", "x"], {}, "provider 'nope' is not configured"),
        (["run", "--repo", "REPO", "--model", "foo", "x"], {}, "expected provider/model"),
        (
            ["run", "--repo", "REPO", "x"],
            {"DEPUTIES_WORKERS": "many"},
            "DEPUTIES_WORKERS='many' is not an integer",
        ),
        (["token", "create", "nobody"], {}, "no user named nobody"),
        (["run", "--server", "http://127.0.0.1:9", "--repo", ".", "x"], {}, "--server needs an API token"),
        (
            ["run", "--server", "http://127.0.0.1:9", "--repo", ".", "x"],
            {"DEPUTIES_TOKEN": "t"},
            "cannot reach",
        ),
        (
            ["run", "--server", "ftp://127.0.0.1:9", "--token", "t", "--repo", ".", "x"],
            {},
            "expected an http",
        ),
        (
            ["run", "--repo", ".", "x"],
            {"DATABASE_URL": "mysql://u:hunter2@db/x"},
            "DATABASE_URL must look like sqlite:///path/to/file.sqlite3 or postgres://",
        ),
    ],
)
def test_it_explains_bad_input_without_a_traceback(tmp_path, owner, sample_repo, args, extra_env, message):
    args = [arg.replace("REPO", str(sample_repo)) for arg in args]
    result = deputies(*args, env=child_env(tmp_path, **extra_env))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr
    assert not Session.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_creates_a_token_that_the_api_accepts(tmp_path, owner, client):
    result = deputies("token", "create", owner.username, "--name", "ci", env=child_env(tmp_path))
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert client.get("/api/v1/sessions", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200


def test_it_starts_simple_mode_and_stops_cleanly_on_ctrl_c(tmp_path):
    """`deputies up` on a fresh data directory: SQLite, admin account, demo model, web and worker."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPUTIES_", "DATABASE_URL", "DJANGO_"))}
    env["DEPUTIES_DATA_DIR"] = str(tmp_path / "var")
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [DEPUTIES, "up", "--port", str(port)], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: "log in at" in log.read_text(), timeout=60, what="the login line")
            text = log.read_text()
            assert f"http://127.0.0.1:{port}/admin/" in text
            assert "SCRIPTED DEMO MODEL" in text
            password = text.split("with password '")[1].split("'")[0]

            def healthy():
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, timeout=60, what="readyz")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                login = client.get("/admin/login/")
                csrf = client.cookies["csrftoken"]
                response = client.post(
                    "/admin/login/?next=/admin/",
                    data={"username": "admin", "password": password, "csrfmiddlewaretoken": csrf},
                    headers={"Referer": f"http://127.0.0.1:{port}/admin/login/"},
                )
                assert login.status_code == 200 and response.status_code in (200, 302)
                assert client.get("/admin/").status_code == 200  # logged in
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert "deputies: stopped" in text
    assert "Traceback" not in text
    assert (tmp_path / "var" / "deputies.sqlite3").exists()
    assert (tmp_path / "var" / "sample-repo" / ".git").exists()


@pytest.mark.django_db(transaction=True)
def test_it_runs_a_prompt_through_a_server_and_follows_it_over_the_websocket(tmp_path, owner, sample_repo):
    from sessions.models import APIToken

    _, secret = APIToken.issue(owner, "cli")
    with start_in_thread(SCRIPT) as fake:
        env = child_env(
            tmp_path,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_DEFAULT_MODEL="scripted/demo",
        )
        with web_process(env) as base, worker_process(env):
            # The client needs no database: only the server's URL and a token.
            client_env = {k: v for k, v in env.items() if k != "DATABASE_URL"}
            result = deputies(
                "run", "--server", base, "--repo", str(sample_repo), "Make the test pass",
                env={**client_env, "DEPUTIES_TOKEN": secret},
            )  # fmt: skip
            refused = deputies(
                "run", "--server", base, "--repo", str(sample_repo), "x", env={**client_env, "DEPUTIES_TOKEN": "dep_nope"}
            )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and secret not in result.stdout + result.stderr
    assert "-> edit_file" in result.stdout and "completed: Fixed add()" in result.stdout
    session = Session.objects.get()
    assert session.status == "completed" and session.created_by == owner
    assert result.stdout.count("-> edit_file") == len(
        session.events.filter(type="tool_started", payload__name="edit_file")
    )
    assert refused.returncode == 2 and "401" in refused.stderr and "Traceback" not in refused.stderr

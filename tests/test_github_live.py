"""The GitHub App end to end with real processes on Postgres: signed webhooks to ``deputies web``, a
``deputies worker`` with the scripted model, the real PyGithub against the loopback fake GitHub, and
clone and push over real git smart HTTP that requires the installation token."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from django.db import connection

from integrations.deliveries.models import Delivery, DeliveryAttempt
from integrations.github.models import Installation
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Artifact, Event, Message, Session
from tests.github_fake import APP_ID, INSTALLATION_ID, FakeGitHub, issue_comment, new_app_key, signed
from tests.live import ROOT, child_env, free_port, wait_for, web_process, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCRIPT = json.loads((ROOT / "deputies" / "demo" / "script.json").read_text())
SECRET = "gh-live-webhook-secret"
REPO = "acme/widgets"


@pytest.fixture(autouse=True)
def postgres_only():
    if connection.vendor != "postgresql":
        pytest.skip("the web process, the worker and the test share the database: needs Postgres")


def finished(session_id: int, runs: int):
    def check() -> Session | None:
        session = Session.objects.get(pk=session_id)
        done = session.runs.filter(status__in=("completed", "failed", "cancelled")).count()
        return session if done >= runs and session.status in ("completed", "failed") else None

    return check


def test_it_turns_an_issue_comment_into_a_pull_request_and_a_pr_comment_into_a_second_commit(
    tmp_path, team, sample_repo
):
    private, public = new_app_key()
    Installation.objects.create(installation_id=INSTALLATION_ID, account="acme", team=team)
    data = tmp_path / "data"
    data.mkdir()
    with FakeGitHub(tmp_path / "git", public_key=public) as fake, start_in_thread(SCRIPT) as llm:
        fake.add_repo(REPO, sample_repo, writers=("alice",))
        issue = fake.add_issue(
            REPO, "add() is broken", "The calc test fails.", comments=[("bob", "Same here.")]
        )
        # The git server really requires a token: an anonymous clone is refused.
        anonymous = subprocess.run(
            ["git", "-c", "credential.helper=", "clone", "-q", fake.clone_url(REPO), str(tmp_path / "anon")],
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "GIT_TERMINAL_PROMPT": "0"},
        )  # fmt: skip
        assert anonymous.returncode != 0 and fake.git_auth[-1][1] is False
        port = free_port()
        key_file = tmp_path / "app-key.pem"
        key_file.write_text(private)
        env = child_env(
            data,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=llm.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="sk-test-secret-value",
            DEPUTIES_DEFAULT_MODEL="scripted/demo",
            DEPUTIES_SANDBOX_ROOT=str(data / "sandboxes"),
            DEPUTIES_SANDBOX_ISOLATION="none",
            DEPUTIES_REPOSITORY_ALLOWED_NETWORKS="127.0.0.0/8",
            DEPUTIES_BASE_URL=f"http://127.0.0.1:{port}",
            DEPUTIES_GITHUB_API_URL=fake.url,
            DEPUTIES_GITHUB_APP_ID=APP_ID,
            DEPUTIES_GITHUB_PRIVATE_KEY_FILE=str(key_file),  # a mounted secret, as in a container
            DEPUTIES_GITHUB_WEBHOOK_SECRET=SECRET,
            DEPUTIES_LOG_LEVEL="DEBUG",  # the grep below covers everything the processes log
        )
        with web_process(env, port) as base, worker_process(env):

            def deliver(payload: dict, guid: str, event: str = "issue_comment") -> httpx.Response:
                raw, headers = signed(SECRET, payload, event, guid)
                return httpx.post(
                    f"{base}/integrations/github/webhook", content=raw, headers=headers, timeout=30
                )

            # A commenter without write access: nothing queued.
            answer = deliver(
                issue_comment(fake, REPO, issue, "/deputy delete everything", login="mallory"), "g-0"
            )
            assert answer.status_code == 202 and answer.json()["ignored"]
            assert not Session.objects.exists()

            answer = deliver(issue_comment(fake, REPO, issue, "/deputy fix the failing test"), "g-1")
            assert answer.status_code == 202, answer.text
            session_id = answer.json()["session"]
            # The same delivery again (GitHub's "Redeliver"): no second session.
            assert deliver(
                issue_comment(fake, REPO, issue, "/deputy fix the failing test"), "g-1"
            ).json() == {"duplicate": True}
            wait_for(lambda: fake.repos[REPO].reactions, timeout=30, what="the 👀 reaction")
            assert fake.repos[REPO].reactions[0][1] == "eyes"

            session = wait_for(finished(session_id, 1), timeout=120, interval=0.2, what="the first run")
            assert session.status == "completed", session.runs.last().error
            branch = session.branch
            assert branch == f"deputies/session-{session_id}"
            commits = fake.branch_log(REPO, branch)
            assert len(commits) == 2 and commits[1].endswith("initial")  # on top of the base commit
            assert "Deputies <deputies[bot]@users.noreply.github.com>" in commits[0]
            assert "Co-authored-by: alice <5+alice@users.noreply.github.com>" in commits[0]
            assert "return a + b" in fake.file_at(REPO, branch, "calc.py")
            first = commits[0]
            (pr,) = fake.repos[REPO].pulls.values()
            assert pr["head"]["ref"] == branch and pr["base"]["ref"] == "main"
            assert pr["title"] == "add() is broken" and f"Closes #{issue['number']}." in pr["body"]
            assert "Fixed add()" in pr["body"] and "- [x] Fix the failing test" in pr["body"]
            assert session.pull_request_url == pr["html_url"]
            back = wait_for(
                lambda: [c for c in fake.repos[REPO].comments[issue["number"]] if c["user"]["login"] == "deputies[bot]"],
                timeout=30, what="the comment back",
            )  # fmt: skip
            assert "Deputies finished." in back[0]["body"] and pr["html_url"] in back[0]["body"]
            assert f"/sessions/{session_id}" in back[0]["body"] and "Cost: $" in back[0]["body"]
            assert Session.objects.filter(source="github").count() == 1

            # A follow-up on the pull request continues the session on its branch.
            pr_item = {**pr, "url": f"{fake.url}/repos/{REPO}/issues/{pr['number']}"}
            answer = deliver(
                issue_comment(fake, REPO, pr_item, "/deputy add a changelog entry", pr=True), "g-2"
            )
            assert answer.json() == {"session": session_id, "created": False}, answer.text
            session = wait_for(finished(session_id, 2), timeout=120, interval=0.2, what="the follow-up run")
            assert session.status == "completed", session.runs.order_by("-pk").first().error
            commits = fake.branch_log(REPO, branch)
            assert len(commits) == 3 and "Co-authored-by: alice" in commits[0] and commits[1] == first
            assert "Fixed add() returning the difference." in fake.file_at(REPO, branch, "CHANGELOG.md")
            assert "return a + b" in fake.file_at(REPO, branch, "calc.py")
            assert len(fake.repos[REPO].pulls) == 1 and fake.calls_to("PATCH", rf"/pulls/{pr['number']}$")
            assert "CHANGELOG" in fake.repos[REPO].pulls[pr["number"]]["body"]
            wait_for(
                lambda: [c for c in fake.repos[REPO].comments.get(pr["number"], []) if c["user"]["login"] == "deputies[bot]"],
                timeout=30, what="the comment back on the pull request",
            )  # fmt: skip
            assert Message.objects.filter(session_id=session_id).count() == 2
            wait_for(
                lambda: not Delivery.objects.exclude(status="delivered").exists(),
                timeout=30,
                what="every delivery",
            )
        assert Event.objects.filter(session_id=session_id, type="pull_request").count() == 2

    # Every git request carried a token the fake granted.
    assert [ok for path, ok in fake.git_auth[1:]] and all(ok for path, ok in fake.git_auth[1:])
    # No installation token (nor its Basic form) anywhere: database rows, logs, files of the data dir.
    tokens = list(fake.tokens)
    assert tokens
    needles = [t.encode() for t in tokens] + [
        base64.b64encode(f"x-access-token:{t}".encode()) for t in tokens
    ]
    rows = [
        *Event.objects.values_list("payload", flat=True),
        *Delivery.objects.values_list("payload", flat=True),
        *DeliveryAttempt.objects.values_list("response_excerpt", "error"),
        *Session.objects.values_list("transcript", "external_ref", "summary"),
        *Message.objects.values_list("content", flat=True),
    ]
    database = json.dumps(rows, default=str).encode()
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "worker.log" for p in files) and any(p.name == "config" for p in files)
    stored = {p.name for p in files}  # the artifacts' bytes are files of the worker's data dir
    assert Artifact.objects.exists() and all(Path(a.file.name).name in stored for a in Artifact.objects.all())
    for needle in needles:
        assert needle not in database
        for path in files:
            assert needle not in path.read_bytes(), path
    for config in [p for p in files if p.name == "config" and p.parent.name == ".git"]:
        assert "extraheader" not in config.read_text().lower(), config

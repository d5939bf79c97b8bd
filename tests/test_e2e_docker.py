"""One session end to end on the docker provider: a real worker process, the scripted model over HTTP,
and a container on a real engine from the offline busybox test image.

Skips (or, with CI=true, fails) like the docker contract tests when no engine answers.
"""

from __future__ import annotations

import json

import pytest

from sandboxes.models import Sandbox
from sandboxes.providers.docker import DockerProvider, engine_client
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Artifact, Environment, Event, Session, start_session
from tests.live import child_env, wait_for, worker_process
from tests.test_sandbox_docker import DEPLOYMENT, IMAGE, require_engine

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Only what busybox (plus the image's bash) can run: no python, no git in the sandbox.
SCRIPT = {
    "responses": [
        {
            "content": "Scripted: looking for the bug.",
            "tool_calls": [
                {
                    "name": "bash",
                    "arguments": {
                        "command": "grep -n 'return a' calc.py; id -u; echo \"$NPM_TOKEN ${DEPLOY_KEY:-no-deploy-key}\""
                    },
                }
            ],
        },
        {"tool_calls": [{"name": "read_file", "arguments": {"path": "calc.py"}}]},
        {
            "tool_calls": [
                {
                    "name": "edit_file",
                    "arguments": {
                        "path": "calc.py",
                        "old_string": "return a - b",
                        "new_string": "return a + b",
                    },
                }
            ]
        },
        {
            "tool_calls": [
                {
                    "name": "write_file",
                    "arguments": {"path": "docs/NOTES.md", "content": "add() adds now.\n"},
                },
                {"name": "bash", "arguments": {"command": "grep -c 'a + b' calc.py && ls docs"}},
            ]
        },
        {"tool_calls": [{"name": "finish", "arguments": {"summary": "Fixed add() in a docker sandbox."}}]},
    ]
}


def test_it_runs_a_session_in_a_docker_sandbox(settings, tmp_path, team, owner, repository):
    require_engine()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"
    settings.DOCKER_DEPLOYMENT = DEPLOYMENT  # the worker labels with it; cleanup below must match
    environment = Environment.objects.create(
        team=team, name="busybox", image=IMAGE, sandbox_provider="docker", network_policy="none"
    )
    environment.change_secrets(
        {
            "NPM_TOKEN": {"value": "npm-visible-0d7c31", "sandbox_visible": True},
            "DEPLOY_KEY": {"value": "deploy-hidden-9a8b7c", "sandbox_visible": False},
        }
    )
    sandbox_ids: list[str] = []
    with start_in_thread(SCRIPT) as fake:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="sk-test-secret-value",
            DEPUTIES_DOCKER_DEPLOYMENT=DEPLOYMENT,
        )
        try:
            with worker_process(env):
                session = start_session(
                    team=team,
                    repository=repository,
                    prompt="Fix add()",
                    model="scripted/demo",
                    environment=environment,
                    created_by=owner,
                )

                def finished():
                    s = Session.objects.get(pk=session.pk)
                    return s if s.status in ("completed", "failed", "cancelled") else None

                done = wait_for(finished, timeout=120, what="the run on the docker provider")
                sandbox_ids = list(
                    Sandbox.objects.filter(session=session).values_list("external_id", flat=True)
                )
                log = (data_dir / "worker.log").read_text()[-3000:]
                events = list(Event.objects.filter(session=session).order_by("seq"))
                assert done.status == "completed", (
                    done.status,
                    [(e.type, e.payload) for e in events][-5:],
                    log,
                )

            assert done.summary == "Fixed add() in a docker sandbox."
            ready = next(e.payload for e in events if e.type == "sandbox_ready")
            assert (ready["provider"], ready["isolated"]) == ("docker", True)
            outputs = [
                e.payload["output"]
                for e in events
                if e.type == "tool_finished" and e.payload["name"] == "bash"
            ]
            assert "5:    return a - b" in outputs[0] and "1000" in outputs[0]  # not root
            # The visible secret reached the container (scrubbed on the way out); the other did not.
            assert "[secret NPM_TOKEN] no-deploy-key" in outputs[0]
            stored = json.dumps([e.payload for e in events])
            assert "npm-visible-0d7c31" not in stored and "deploy-hidden-9a8b7c" not in stored
            assert outputs[1].startswith("1\nNOTES.md")
            assert "sk-test-secret-value" not in json.dumps([e.payload for e in events])

            (diff,) = Artifact.objects.filter(session=session, kind="diff")
            with diff.file.open("rb") as fh:
                text = fh.read().decode()
            assert "-    return a - b" in text and "+    return a + b" in text
            assert "+++ b/docs/NOTES.md" in text and "+add() adds now." in text

            # The sandbox stays for follow-ups: the container of this session, with its labels.
            (sandbox,) = Sandbox.objects.filter(session=session)
            info = engine_client().api.inspect_container(sandbox.external_id)
            assert info["State"]["Running"] is True
            assert info["Config"]["Labels"]["deputies.session"] == str(session.pk)
            assert info["Config"]["Image"] == IMAGE
            assert info["HostConfig"]["NetworkMode"] == "none"
        finally:
            for sandbox_id in sandbox_ids:
                if sandbox_id:
                    DockerProvider().destroy(sandbox_id)

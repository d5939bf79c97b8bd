"""Profiles, skills and an MCP server on real processes: a ``deputies worker``, the scripted model
over HTTP and a real MCP server on loopback."""

from __future__ import annotations

import json

import pytest

from sessions.agent.fake_llm import start_in_thread
from sessions.models import AgentProfile, Environment, Event, Session, Skill, start_session
from tests.live import child_env, wait_for, worker_process
from tests.test_agent_mcp import TOKEN, LiveMcpServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_it_runs_a_profile_with_skills_and_mcp_tools_in_a_real_worker(
    settings, tmp_path, team, owner, repository
):
    mcp_server = LiveMcpServer()
    try:
        environment = Environment.objects.create(team=team, name="e2e")
        environment.change_secrets({"MCP_TOKEN": {"value": TOKEN}}, new_revision=False)
        Skill.objects.create(
            team=team, name="triage", description="Route a bug", body="Ask for a repro first."
        )
        profile = AgentProfile.objects.create(
            team=team, name="no-shell", allowed_tools=["load_skill", "docs__*", "finish"]
        )
        session = start_session(
            team=team,
            repository=repository,
            environment=environment,
            prompt="Triage and add",
            model="scripted/demo",
            created_by=owner,
            profile=profile,
        )
        script = {
            "responses": [
                {"tool_calls": [{"name": "load_skill", "arguments": {"name": "triage"}}]},
                {"tool_calls": [{"name": "docs__add", "arguments": {"a": 2, "b": 40}}]},
                {"tool_calls": [{"name": "docs__whoami", "arguments": {}}]},
                {"tool_calls": [{"name": "finish", "arguments": {"summary": "42"}}]},
            ]
        }
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        with start_in_thread(script) as fake:
            servers = [
                {"name": "docs", "url": mcp_server.url, "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}}
            ]
            env = child_env(
                data_dir,
                DEPUTIES_LLM_PROVIDERS="scripted",
                DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
                DEPUTIES_LLM_SCRIPTED_API_KEY="k",
                DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
                DEPUTIES_SANDBOX_ISOLATION="none",
                DEPUTIES_MCP_SERVERS=json.dumps(servers),
                DEPUTIES_MCP_ALLOWED_NETWORKS="127.0.0.1",
            )
            with worker_process(env):
                wait_for(
                    lambda: Session.objects.get(pk=session.pk).status in ("completed", "failed"),
                    timeout=60,
                    what="the session to end",
                )
            bodies = [r["body"] for r in fake.requests]
    finally:
        mcp_server.stop()
    session.refresh_from_db()
    assert (session.status, session.summary, session.error) == ("completed", "42", "")
    names = [t["function"]["name"] for t in bodies[0]["tools"]]
    assert "bash" not in names and {"load_skill", "docs__add", "docs__whoami", "finish"} <= set(names)
    assert "`triage`: Route a bug" in bodies[0]["messages"][0]["content"]
    finished = [
        e.payload for e in Event.objects.filter(session=session, type="tool_finished").order_by("seq")
    ]
    assert "Ask for a repro first." in finished[0]["output"]
    assert finished[1]["output"] == "42"
    assert finished[2]["output"] == "you sent: Bearer [secret MCP_TOKEN]"
    assert TOKEN not in json.dumps([e.payload for e in Event.objects.filter(session=session)])

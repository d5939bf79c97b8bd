"""MCP servers as agent tools: a real MCP server (the ``mcp`` SDK's MCPServer, streamable HTTP) on
loopback, called by the worker during real runs driven by the scripted model over HTTP."""

from __future__ import annotations

import json
import threading
import time

import pytest

from deputies.netguard import parse_networks
from sessions.agent import mcp
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Environment, Event, McpServer, start_session
from sessions.runner import execute
from tests.live import wait_for
from tests.mcp_server import LiveMcpServer

TOKEN = "mcp-secret-abcdef123"


@pytest.fixture
def mcp_server():
    server = LiveMcpServer()
    yield server
    server.stop()


def call(tool: str, **arguments) -> dict:
    return {"name": tool, "arguments": arguments}


def outputs(session) -> list[dict]:
    return [e.payload for e in Event.objects.filter(session=session, type="tool_finished").order_by("seq")]


@pytest.fixture
def session(team, owner, repository):
    environment = Environment.objects.create(team=team, name="mcp")
    environment.change_secrets({"MCP_TOKEN": {"value": TOKEN}}, new_revision=False)
    return start_session(
        team=team,
        repository=repository,
        environment=environment,
        prompt="Add",
        model="scripted/demo",
        created_by=owner,
    )


def test_it_calls_a_teams_mcp_server_through_the_worker(run_settings, team, session, mcp_server):
    run_settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    run_settings.MCP_TIMEOUT = 10.0
    McpServer.objects.create(
        team=team, name="docs", url=mcp_server.url, headers={"Authorization": "Bearer ${MCP_TOKEN}"}
    )
    script = {
        "responses": [
            {"tool_calls": [call("docs__add", a=2, b=3), call("docs__whoami")]},
            {"tool_calls": [call("docs__add", a=1, b=1)]},  # the server is stopped before this one runs
            {"tool_calls": [call("finish", summary="2 + 3 = 5")]},
        ]
    }
    with start_in_thread(script) as fake:

        def stop_on_second_request(body: dict) -> None:
            if sum(m["role"] == "assistant" for m in body["messages"]) == 1:
                mcp_server.stop()

        fake.on_request = stop_on_second_request
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
        bodies = [r["body"] for r in fake.requests]

    tools = {t["function"]["name"]: t["function"] for t in bodies[0]["tools"]}
    assert {"docs__add", "docs__whoami"} <= set(tools)
    assert tools["docs__add"]["description"] == "Add two integers."
    assert set(tools["docs__add"]["parameters"]["properties"]) == {"a", "b"}
    added, whoami, down, finish = outputs(session)
    assert (added["name"], added["ok"], added["output"]) == ("docs__add", True, "5")
    # The header reached the server; its value is scrubbed from what comes back.
    assert whoami["ok"] is True and whoami["output"] == "you sent: Bearer [secret MCP_TOKEN]"
    assert down["ok"] is False and "MCP server 'docs' failed" in down["output"]
    assert finish["name"] == "finish"
    session.refresh_from_db()
    assert (session.status, session.summary) == ("completed", "2 + 3 = 5")
    everything = json.dumps([e.payload for e in Event.objects.filter(session=session)]) + json.dumps(bodies)
    assert TOKEN not in everything
    started = [e.payload for e in Event.objects.filter(session=session, type="tool_started").order_by("seq")]
    assert started[0]["arguments"] == {"a": 2, "b": 3}


def test_it_leaves_out_a_server_the_address_rules_refuse(run_settings, session, mcp_server):
    """Loopback is refused by default: the server is never contacted and the run goes on without it."""
    run_settings.MCP_SERVERS = [{"name": "local", "url": mcp_server.url, "headers": {}}]
    with start_in_thread({"responses": [{"content": "Nothing to call."}]}) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
        bodies = [r["body"] for r in fake.requests]
    assert not [t for t in bodies[0]["tools"] if t["function"]["name"].startswith("local__")]
    (unavailable,) = [e.payload for e in Event.objects.filter(session=session, type="mcp_unavailable")]
    assert unavailable["server"] == "local" and "loopback" in unavailable["error"]
    assert "DEPUTIES_MCP_ALLOWED_NETWORKS" in unavailable["error"]
    session.refresh_from_db()
    assert session.status == "completed"


def test_it_names_a_missing_header_secret_without_failing_the_run(run_settings, session, mcp_server):
    run_settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    run_settings.MCP_SERVERS = [{"name": "docs", "url": mcp_server.url, "headers": {"X-Key": "${NOPE}"}}]
    with start_in_thread({"responses": [{"content": "ok"}]}) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
    (unavailable,) = [e.payload for e in Event.objects.filter(session=session, type="mcp_unavailable")]
    assert "names the secret NOPE" in unavailable["error"]
    session.refresh_from_db()
    assert session.status == "completed"


def test_it_shows_an_unavailable_server_in_the_timeline(run_settings, session, owner):
    from django.test import Client

    from sessions.events import emit

    emit(session.pk, "mcp_unavailable", {"server": "docs", "error": "ConnectError: refused"})
    client = Client()
    client.force_login(owner)
    page = client.get(f"/sessions/{session.pk}").content.decode()
    assert "MCP server docs unavailable, its tools are left out: ConnectError: refused" in page


def test_it_calls_mcp_servers_for_several_runs_at_once(settings, mcp_server):
    """Runs are threads sharing the worker's one MCP event loop: a slow call does not hold up another."""
    from sessions.agent.mcp import Connection, ServerConfig, result_text

    settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    settings.MCP_TIMEOUT = 10.0
    server = ServerConfig("docs", mcp_server.url, {})
    answers: list[str] = []

    def one() -> None:  # one run's connection
        connection = Connection(server, {})
        try:
            answers.append(result_text(connection.call_tool("rendezvous", {})))
        finally:
            connection.close()

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert answers == ["together", "together"]


def test_it_gives_up_on_a_call_past_the_mcp_timeout_and_reconnects(settings, mcp_server):
    from sessions.agent.mcp import Connection, ServerConfig, _handler
    from sessions.agent.tools import ToolError

    settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    settings.MCP_TIMEOUT = 0.5
    with pytest.raises(ToolError) as failure:
        _handler(Connection(ServerConfig("docs", mcp_server.url, {}), {}), "hang", "docs__hang")({})
    assert "docs__hang: MCP server 'docs' failed: no answer within 0.5 s (DEPUTIES_MCP_TIMEOUT)" in str(
        failure.value
    )
    # A server's own timeout wins; after giving up on a call, the next one opens a new session.
    connection = Connection(ServerConfig("docs", mcp_server.url, {}, timeout=2.0), {})
    try:
        with pytest.raises(ToolError) as failure:
            _handler(connection, "hang", "docs__hang")({})
        assert "no answer within 2 s (the server's timeout)" in str(failure.value)
        assert _handler(connection, "add", "docs__add")({"a": 1, "b": 2}).output == "3"
        assert connection.opened == 2
    finally:
        connection.close()


def test_it_keeps_one_session_per_server_for_a_run(run_settings, team, session, mcp_server):
    """Listing the tools and every call of the run share one MCP session, closed at the run's end."""
    run_settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    run_settings.MCP_TIMEOUT = 10.0
    McpServer.objects.create(team=team, name="docs", url=mcp_server.url)
    script = {
        "responses": [
            {"tool_calls": [call("docs__add", a=1, b=2), call("docs__add", a=3, b=4)]},
            {"tool_calls": [call("docs__whoami")]},
            {"tool_calls": [call("finish", summary="done")]},
        ]
    }
    with start_in_thread(script) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
    assert [(o["name"], o["ok"]) for o in outputs(session)][:3] == [
        ("docs__add", True),
        ("docs__add", True),
        ("docs__whoami", True),
    ]
    calls = [rpc for _, rpc in mcp_server.requests if rpc == "tools/call"]
    assert (mcp_server.handshakes, len(calls)) == (1, 3)
    # Closed with the run's toolset: no session is left open in the worker.
    wait_for(lambda: not mcp._holders, timeout=10, what="the run's MCP sessions to close")


def test_it_opens_a_new_session_when_the_server_comes_back(settings):
    """A server that went away fails the call at once; once it is back, the next call reconnects."""
    from sessions.agent.mcp import Connection, ServerConfig, _handler
    from sessions.agent.tools import ToolError

    settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    settings.MCP_TIMEOUT = 10.0
    first = LiveMcpServer()
    connection = Connection(ServerConfig("docs", first.url, {}), {})
    add = _handler(connection, "add", "docs__add")
    again = None
    try:
        assert add({"a": 1, "b": 1}).output == "2"
        first.stop()
        started = time.monotonic()
        with pytest.raises(ToolError) as failure:
            add({"a": 2, "b": 2})
        assert time.monotonic() - started < 5  # not the 10 s timeout
        assert "docs__add: MCP server 'docs' failed: " in str(failure.value)
        again = LiveMcpServer(port=first.port)
        assert add({"a": 3, "b": 3}).output == "6"
        assert connection.opened == 2
    finally:
        connection.close()
        if again is not None:
            again.stop()

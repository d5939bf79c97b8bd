"""MCP servers as agent tools: a real MCP server (the ``mcp`` SDK's MCPServer, streamable HTTP) on
loopback, called by the worker during real runs driven by the scripted model over HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
import uvicorn
from mcp.server.mcpserver import Context, MCPServer

from deputies.netguard import parse_networks
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Environment, Event, McpServer, start_session
from sessions.runner import execute
from tests.live import wait_for

TOKEN = "mcp-secret-abcdef123"


class LiveMcpServer:
    """An MCP server with two tools, served by uvicorn on a loopback port until stopped."""

    def __init__(self) -> None:
        app = MCPServer("docs")

        @app.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        self.in_flight = 0

        @app.tool()
        async def rendezvous() -> str:
            """Wait (up to 5 s) until another call is in flight too."""
            self.in_flight += 1
            for _ in range(100):
                if self.in_flight >= 2:
                    return "together"
                await asyncio.sleep(0.05)
            return "alone"

        self.release = asyncio.Event()

        @app.tool()
        async def hang() -> str:
            """Answer only when the test lets go."""
            await self.release.wait()
            return "released"

        @app.tool()
        async def whoami(ctx: Context) -> str:
            """Echo the Authorization header this call carried."""
            return f"you sent: {(ctx.headers or {}).get('authorization', '(none)')}"

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app.streamable_http_app(), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.force_exit = True  # a hanging call does not hold the shutdown up
            self.server.should_exit = True
            self.thread.join(10)
        self.sock.close()


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
    from sessions.agent.mcp import ServerConfig, call_tool, result_text

    settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    settings.MCP_TIMEOUT = 10.0
    server = ServerConfig("docs", mcp_server.url, {})
    answers: list[str] = []

    def one() -> None:
        answers.append(result_text(call_tool(server, {}, "rendezvous", {})))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert answers == ["together", "together"]


def test_it_gives_up_on_a_call_past_the_mcp_timeout(settings, mcp_server):
    from sessions.agent.mcp import ServerConfig, _handler
    from sessions.agent.tools import ToolError

    settings.MCP_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    settings.MCP_TIMEOUT = 0.5
    handler = _handler(ServerConfig("docs", mcp_server.url, {}), {}, "hang", "docs__hang")
    with pytest.raises(ToolError) as failure:
        handler({})
    assert "docs__hang: MCP server 'docs' failed: no answer within 0.5 s (DEPUTIES_MCP_TIMEOUT)" in str(
        failure.value
    )

"""Remote MCP servers (streamable HTTP) as agent tools, called by the worker with the official SDK.

Servers come from ``DEPUTIES_MCP_SERVERS`` (every team) and the team's ``McpServer`` rows (a team
row wins over a deployment server of the same name). At the start of a run the worker lists each
server's tools; the model sees them as ``server__tool``. Header values name secrets of the session's
environment as ``${NAME}``: they are filled in here, in the worker, and the values are scrubbed
from everything the server sends back, like any sandbox output. The sandbox never sees a server.

The SDK is async. The worker is not (a run is a thread), so every call goes to one private event
loop on a daemon thread and the run's thread waits for it with a deadline
(``DEPUTIES_MCP_TIMEOUT``); other runs' calls share that loop concurrently. Each call opens its own
MCP session: a server that restarted or went away fails that call with a tool error the model
reads, never the run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from deputies.netguard import UnsafeAddress, check_url, guarded_async_client
from sessions.agent.tools import ToolError, ToolResult

log = logging.getLogger(__name__)

ALLOWED_SETTING = "DEPUTIES_MCP_ALLOWED_NETWORKS"
SECRET_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
TOOL_NAME_LIMIT = 64  # OpenAI's limit for function names
MAX_TOOLS_PER_SERVER = 100


class McpError(Exception):
    """A server cannot be used or a call failed; the message never carries a header value."""


@dataclass(frozen=True)
class ServerConfig:
    name: str
    url: str
    headers: dict[str, str]


def configured_servers(team_id: int) -> list[ServerConfig]:
    from sessions.models import McpServer

    servers = {
        s["name"]: ServerConfig(s["name"], s["url"], dict(s.get("headers") or {}))
        for s in settings.MCP_SERVERS
    }
    for row in McpServer.objects.filter(team_id=team_id, enabled=True):
        servers[row.name] = ServerConfig(row.name, row.url, dict(row.headers or {}))
    return list(servers.values())


def fill_headers(server: ServerConfig, secrets: dict[str, str]) -> dict[str, str]:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in secrets:
            raise McpError(
                f"MCP server {server.name!r}: a header names the secret {name}, which the session's "
                "environment does not have"
            )
        return secrets[name]

    return {str(k): SECRET_REF.sub(value, str(v)) for k, v in server.headers.items()}


# --- the private event loop ----------------------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_loop_pid = 0
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """This process's MCP loop (a forked worker process starts its own: threads do not survive fork)."""
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop.is_closed() or _loop_pid != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="deputies-mcp", daemon=True).start()
            _loop, _loop_pid = loop, os.getpid()
        return _loop


def run_async(coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
    """Run ``coro`` on the MCP loop and wait at most ``timeout`` seconds (then it is cancelled)."""
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), _event_loop())
    try:
        return future.result(timeout + 5)
    except TimeoutError:
        future.cancel()
        raise


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    exc = _root_cause(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer within {settings.MCP_TIMEOUT:g} s (DEPUTIES_MCP_TIMEOUT)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- calls ----------------------------------------------------------------------------------------


async def _with_client(url: str, headers: dict[str, str], work):
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    timeout = settings.MCP_TIMEOUT
    http = guarded_async_client(
        settings.MCP_ALLOWED_NETWORKS, ALLOWED_SETTING, timeout=timeout, headers=headers
    )
    async with http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, read_timeout_seconds=timeout, cache=None) as client:
            return await work(client)


def list_tools(server: ServerConfig, headers: dict[str, str]) -> list[Any]:
    async def work(client):
        tools, cursor = [], None
        while len(tools) < MAX_TOOLS_PER_SERVER:
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools[:MAX_TOOLS_PER_SERVER]

    return run_async(_with_client(server.url, headers, work), settings.MCP_TIMEOUT)


def call_tool(server: ServerConfig, headers: dict[str, str], tool: str, arguments: dict[str, Any]) -> Any:
    async def work(client):
        return await client.call_tool(tool, arguments)

    return run_async(_with_client(server.url, headers, work), settings.MCP_TIMEOUT)


def result_text(result: Any) -> str:
    parts = []
    for block in result.content:
        if getattr(block, "type", "") == "text":
            parts.append(block.text)
        else:
            parts.append(f"[{getattr(block, 'type', 'unknown')} content, not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, indent=2, default=str))
    return "\n".join(parts) or "(no output)"


def tool_name(server: str, tool: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", tool)
    return f"{server}__{safe}"[:TOOL_NAME_LIMIT]


# --- the toolset's side --------------------------------------------------------------------------


def discover(context: Any) -> list[tuple[dict[str, Any], Any]]:
    """(spec, handler) for every tool of every server this run may use. A server that cannot be
    reached now is left out with an ``mcp_unavailable`` event; the run goes on without it."""
    servers = configured_servers(context.session.team_id)
    if not servers:
        return []
    environment = context.session.environment
    if environment is not None and not context.secrets:
        context.secrets = {s.name: s.value for s in environment.decrypted_secrets()}
    found: list[tuple[dict[str, Any], Any]] = []
    for server in servers:
        try:
            check_url(server.url, allowed=settings.MCP_ALLOWED_NETWORKS, setting=ALLOWED_SETTING)
            headers = fill_headers(server, context.secrets)
            tools = list_tools(server, headers)
        except (McpError, UnsafeAddress) as exc:
            _unavailable(context, server, str(exc))
            continue
        except Exception as exc:  # the SDK's and the network's failures: this server, not the run
            _unavailable(context, server, describe_error(exc))
            continue
        names = set()
        for tool in tools:
            name = tool_name(server.name, tool.name)
            if name in names:
                continue
            names.add(name)
            schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
            spec = {
                "name": name,
                "description": (tool.description or f"The {tool.name} tool of MCP server {server.name}.")[
                    :1024
                ],
                "parameters": {"type": "object", "properties": {}, **schema},
            }
            found.append((spec, _handler(server, headers, tool.name, name)))
    return found


def _unavailable(context: Any, server: ServerConfig, error: str) -> None:
    if context.redactor:
        error = context.redactor.text(error)
    log.warning("session %s: MCP server %s unavailable: %s", context.session.pk, server.name, error)
    if context.emit is not None:
        context.emit("mcp_unavailable", {"server": server.name, "error": error[:1000]})


def _handler(server: ServerConfig, headers: dict[str, str], tool: str, exposed: str):
    def handle(args: dict[str, Any]) -> ToolResult:
        try:
            result = call_tool(server, headers, tool, args)
        except Exception as exc:
            raise ToolError(f"{exposed}: MCP server {server.name!r} failed: {describe_error(exc)}") from None
        return ToolResult(ok=not result.is_error, output=result_text(result))

    return handle

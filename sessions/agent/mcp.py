"""Remote MCP servers (streamable HTTP) as agent tools, called by the worker with the official SDK.

Servers come from ``DEPUTIES_MCP_SERVERS`` (every team) and the team's ``McpServer`` rows (a team
row wins over a deployment server of the same name). At the start of a run the worker lists each
server's tools; the model sees them as ``server__tool``. Header values name secrets of the session's
environment as ``${NAME}``: they are filled in here, in the worker, and the values are scrubbed
from everything the server sends back, like any sandbox output. The sandbox never sees a server.

The SDK is async. The worker is not (a run is a thread), so every call goes to one private event
loop on a daemon thread and the run's thread waits for it with a deadline (the server's timeout,
else ``DEPUTIES_MCP_TIMEOUT``); other runs' calls share that loop concurrently. A run keeps one
MCP session per server (``Connection``), opened to list the tools and closed with the run's
toolset. A server that restarted or went away fails that call with a tool error the model reads,
never the run, and the next call opens a new session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
    timeout: float | None = None  # seconds per call; None: DEPUTIES_MCP_TIMEOUT


def configured_servers(team_id: int) -> list[ServerConfig]:
    from sessions.models import McpServer

    servers = {
        s["name"]: ServerConfig(s["name"], s["url"], dict(s.get("headers") or {}))
        for s in settings.MCP_SERVERS
    }
    for row in McpServer.objects.filter(team_id=team_id, enabled=True):
        servers[row.name] = ServerConfig(row.name, row.url, dict(row.headers or {}), row.timeout_seconds)
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


# --- what a server row may say (the API, the dashboard and the admin check the same) -------------

# Set by the transport, or by the SDK for the protocol: a row may not override them.
RESERVED_HEADERS = {
    "accept",
    "connection",
    "content-length",
    "content-type",
    "host",
    "last-event-id",
    "mcp-protocol-version",
    "mcp-session-id",
    "transfer-encoding",
}
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")  # an HTTP token
# Headers that carry a credential by their name: their value must come from a secret, so that what
# a row stores (and the API and pages show) is never the credential itself.
CREDENTIAL_HEADER = re.compile(r"auth|cookie|token|secret|key|passw|credential", re.IGNORECASE)
MAX_HEADERS = 20


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a server's endpoint, or None (also checked again at connect time)."""
    if not url.strip():
        return "The server's streamable HTTP endpoint, e.g. https://mcp.example.com/mcp."
    try:
        if "@" in urlsplit(url).netloc:
            return "No credentials in the URL: send them in a header that names a secret, e.g. ${MCP_TOKEN}."
        check_url(url, allowed=settings.MCP_ALLOWED_NETWORKS, setting=ALLOWED_SETTING)
    except UnsafeAddress as exc:
        return f"{exc}."
    except ValueError as exc:  # what urlsplit or the resolver make of a malformed URL
        return f"Not a valid URL: {exc}."
    return None


def header_problems(headers: Any, team_id: int | None) -> dict[str, str]:
    """What is wrong with a server's headers, by header name ("" for the whole object)."""
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return {"": 'An object of header names to strings, e.g. {"Authorization": "Bearer ${MCP_TOKEN}"}.'}
    if len(headers) > MAX_HEADERS:
        return {"": f"At most {MAX_HEADERS} headers."}
    problems: dict[str, str] = {}
    named: dict[str, set[str]] = {}
    for header, value in headers.items():
        if not HEADER_NAME.match(header):
            problems[header] = "Not an HTTP header name (letters, digits and - only)."
        elif header.lower() in RESERVED_HEADERS:
            problems[header] = "Set by the MCP client itself; it cannot be overridden."
        elif any(c in value for c in "\r\n\x00"):
            problems[header] = "A header value may not contain line breaks or null characters."
        elif not (secrets := SECRET_REF.findall(value)) and CREDENTIAL_HEADER.search(header):
            problems[header] = (
                "A credential: take it from a secret of the team's environments, e.g. "
                '"Bearer ${MCP_TOKEN}", rather than storing it here.'
            )
        else:
            named[header] = set(secrets)
    wanted = set().union(*named.values()) if named else set()
    if wanted and team_id is not None:
        from sessions.models import EnvironmentSecret

        known = set(
            EnvironmentSecret.objects.filter(environment__team_id=team_id, name__in=wanted).values_list(
                "name", flat=True
            )
        )
        for header, secrets in named.items():
            if missing := sorted(secrets - known):
                problems[header] = (
                    f"No environment of the team has a secret named {', '.join(missing)}; add it to "
                    "the environment sessions run with."
                )
    return problems


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


def describe_error(exc: BaseException, timeout: float | None = None) -> str:
    exc = _root_cause(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        if timeout is not None and timeout != settings.MCP_TIMEOUT:
            return f"no answer within {timeout:g} s (the server's timeout)"
        return f"no answer within {settings.MCP_TIMEOUT:g} s (DEPUTIES_MCP_TIMEOUT)"
    text = str(exc).strip()
    if isinstance(exc, McpError):  # ours: already says what happened
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- sessions ------------------------------------------------------------------------------------


async def _all_tools(client: Any) -> list[Any]:
    tools, cursor = [], None
    while len(tools) < MAX_TOOLS_PER_SERVER:
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools[:MAX_TOOLS_PER_SERVER]


@asynccontextmanager
async def _client(url: str, headers: dict[str, str], timeout: float):
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    http = guarded_async_client(
        settings.MCP_ALLOWED_NETWORKS, ALLOWED_SETTING, timeout=timeout, headers=headers
    )
    async with http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, read_timeout_seconds=timeout, cache=None) as client:
            yield client


_holders: set[asyncio.Task] = set()


class Connection:
    """One MCP session with one server, kept open for a run's calls: opening one (an HTTP client and
    the protocol handshake) costs ~30 ms of worker CPU and ~130 ms on loopback; a call on an open
    session, ~1.5 ms and ~2.5 ms (bench/mcp_calls.py).

    The SDK's client is an anyio context, which must be entered and left by one task: a task of its
    own enters it, hands the client over and waits to be told to close. Calls are other tasks on
    the same loop. A call that fails for any reason (the server went away, dropped the session,
    took too long, answered with an error) ends the session, so the next call opens a new one; the
    failure is that call's tool error, never the run's.
    """

    def __init__(self, server: ServerConfig, headers: dict[str, str]) -> None:
        self.server, self.headers = server, headers
        self.timeout = server.timeout or settings.MCP_TIMEOUT
        self.opened = 0  # MCP sessions opened so far (for tests and bench/mcp_calls.py)
        self._client: Any = None
        self._holder: asyncio.Task | None = None
        self._closing: asyncio.Event | None = None
        self._lock = asyncio.Lock()  # bound to the MCP loop on first use

    async def _open(self) -> None:
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        closing = asyncio.Event()

        async def hold() -> BaseException | None:
            try:
                async with _client(self.server.url, self.headers, self.timeout) as client:
                    ready.set_result(client)
                    await closing.wait()
            except BaseException as exc:  # noqa: BLE001 - for the waiting call, or the one under way
                if not ready.done():
                    ready.set_exception(exc)
                return exc
            return None

        holder = asyncio.create_task(hold(), name=f"mcp-{self.server.name}")
        _holders.add(holder)  # the loop keeps only weak references to tasks
        holder.add_done_callback(_holders.discard)
        try:
            client = await ready
        except BaseException:
            holder.cancel()
            raise
        self._client, self._holder, self._closing = client, holder, closing
        self.opened += 1

    def _forget(self) -> asyncio.Task | None:
        """Let go of the session: its task closes it in the background; the next call opens another."""
        holder, closing = self._holder, self._closing
        self._client = self._holder = self._closing = None
        if closing is not None:
            closing.set()
        return holder

    async def _close(self) -> None:
        holder = self._forget()
        if holder is not None:
            try:  # a polite DELETE of the session; a server that is gone does not hold the run up
                await asyncio.wait_for(holder, 5)
            except BaseException:  # noqa: BLE001 - wait_for cancelled it
                pass

    async def request(self, work: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        async with self._lock:  # one open at a time; calls on an open session run concurrently
            if self._holder is not None and self._holder.done():  # it ended between calls
                self._forget()
            if self._client is None:
                await self._open()
            client, holder = self._client, self._holder
        call = asyncio.ensure_future(work(client))
        try:
            await asyncio.wait({call, holder}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the deadline: this call and its session are given up
            call.cancel()
            if self._holder is holder:
                self._forget()
            raise
        if call.done() and not call.cancelled() and call.exception() is None:
            return call.result()
        failure = call.exception() if call.done() and not call.cancelled() else None
        call.cancel()  # still waiting: the session ended under it (the transport failed)
        if self._holder is holder:
            self._forget()
        await asyncio.wait({holder}, timeout=1)  # told to close: it ends now, unless it already has
        ended = holder.result() if holder.done() and not holder.cancelled() else None
        if ended is not None:  # the transport failed: that says more than the call's own error
            raise McpError(describe_error(ended)) from failure
        raise failure or McpError("the session ended")

    def run(self, work: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        """``work(client)`` on this server's session, from the run's thread, within the timeout."""
        return run_async(self.request(work), self.timeout)

    async def list_tools(self) -> list[Any]:
        return await asyncio.wait_for(self.request(_all_tools), self.timeout)

    def call_tool(self, tool: str, arguments: dict[str, Any]) -> Any:
        return self.run(lambda client: client.call_tool(tool, arguments))

    def close(self) -> None:
        if self._holder is not None:
            try:
                run_async(self._close(), 10)
            except Exception:  # noqa: BLE001 - closing is best effort; the server reaps idle sessions
                log.warning("MCP server %s: closing the session failed", self.server.name, exc_info=True)


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
    reached now is left out with an ``mcp_unavailable`` event; the run goes on without it.

    Each server's session, opened here to list its tools (all servers at once), stays open for the
    run's calls; ``context.cleanups`` closes it when the run's toolset is closed."""
    servers = configured_servers(context.session.team_id)
    if not servers:
        return []
    environment = context.session.environment
    if environment is not None and not context.secrets:
        context.secrets = {s.name: s.value for s in environment.decrypted_secrets()}
    connections: list[Connection] = []
    for server in servers:
        try:
            check_url(server.url, allowed=settings.MCP_ALLOWED_NETWORKS, setting=ALLOWED_SETTING)
            connections.append(Connection(server, fill_headers(server, context.secrets)))
        except (McpError, UnsafeAddress) as exc:
            _unavailable(context, server, str(exc))
    if not connections:
        return []

    async def list_all() -> list[Any]:
        return await asyncio.gather(*(c.list_tools() for c in connections), return_exceptions=True)

    listed = run_async(list_all(), max(c.timeout for c in connections) + 1)
    found: list[tuple[dict[str, Any], Any]] = []
    for connection, tools in zip(connections, listed, strict=True):
        context.cleanups.append(connection.close)
        if isinstance(tools, BaseException):  # the SDK's and the network's failures: this server's
            _unavailable(context, connection.server, describe_error(tools, connection.timeout))
            continue
        server, names = connection.server, set()
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
            found.append((spec, _handler(connection, tool.name, name)))
    return found


def _unavailable(context: Any, server: ServerConfig, error: str) -> None:
    if context.redactor:
        error = context.redactor.text(error)
    log.warning("session %s: MCP server %s unavailable: %s", context.session.pk, server.name, error)
    if context.emit is not None:
        context.emit("mcp_unavailable", {"server": server.name, "error": error[:1000]})


def _handler(connection: Connection, tool: str, exposed: str):
    def handle(args: dict[str, Any]) -> ToolResult:
        try:
            result = connection.call_tool(tool, args)
        except Exception as exc:
            why = describe_error(exc, connection.timeout)
            raise ToolError(f"{exposed}: MCP server {connection.server.name!r} failed: {why}") from None
        return ToolResult(ok=not result.is_error, output=result_text(result))

    return handle

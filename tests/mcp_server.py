"""A real MCP server for tests and benches: the ``mcp`` SDK's MCPServer over streamable HTTP, served
by uvicorn on a loopback port. It records the requests it gets (HTTP and JSON-RPC method), which is
how a test shows a run opens one MCP session per server rather than one per call.

``python tests/mcp_server.py`` serves it until killed and prints the port (bench/mcp_calls.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from mcp.server.mcpserver import Context, MCPServer


class LiveMcpServer:
    """An MCP server with a few tools, served by uvicorn on a loopback port until stopped."""

    def __init__(self, port: int = 0) -> None:
        app = MCPServer("docs")
        self.requests: list[tuple[str, str]] = []  # (HTTP method, JSON-RPC method)

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
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarted on the same port
        # Accepted sockets inherit it: without it, uvicorn's separate writes of a response's head
        # and body meet delayed ACKs, and every request takes ~40 ms on loopback.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.recording(app.streamable_http_app()), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the MCP server did not start within 10 s")
            time.sleep(0.02)

    def recording(self, asgi):
        """``asgi``, noting each request's HTTP method and JSON-RPC method (a client's handshake is
        ``server/discover`` on the 2026 protocol, ``initialize`` on older ones)."""

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return await asgi(scope, receive, send)
            body = bytearray()

            async def receiving():
                message = await receive()
                if message["type"] == "http.request":
                    body.extend(message.get("body", b""))
                    if not message.get("more_body"):
                        try:
                            rpc = json.loads(body or b"{}")
                        except ValueError:
                            rpc = {}
                        method = rpc.get("method", "") if isinstance(rpc, dict) else "batch"
                        self.requests.append((scope["method"], method))
                return message

            if scope["method"] != "POST":
                self.requests.append((scope["method"], ""))
            await asgi(scope, receiving, send)

        return app

    @property
    def handshakes(self) -> int:
        """How many MCP sessions clients opened."""
        return sum(rpc in ("server/discover", "initialize") for _, rpc in self.requests)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.force_exit = True  # a hanging call does not hold the shutdown up
            self.server.should_exit = True
            self.thread.join(10)
        self.sock.close()


if __name__ == "__main__":
    server = LiveMcpServer()
    print(server.port, flush=True)
    server.thread.join()

"""MCP tool calls: what one call costs the worker with a new MCP session per call (what every call
did before sessions were kept per run) and on the run's kept session (sessions/agent/mcp.py
``Connection``).

The server is tests/mcp_server.py (the ``mcp`` SDK's MCPServer over streamable HTTP) in its own
process on loopback; CPU is counted for the worker's side and the server's separately. Prints JSON.
Usage: .venv/bin/python bench/mcp_calls.py [--calls 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentiles  # noqa: E402


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def process_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(calls: int, one_call, server_pid: int) -> dict:
    walls = []
    cpu0, server0 = time.process_time(), process_cpu_ms(server_pid)
    for i in range(calls):
        started = time.perf_counter()
        one_call(i)
        walls.append((time.perf_counter() - started) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / calls
    server = (process_cpu_ms(server_pid) - server0) / calls
    return {
        "wall_ms": percentiles(walls),
        "worker_cpu_ms_per_call": round(cpu, 2),
        "server_cpu_ms_per_call": round(server, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    os.environ["DEPUTIES_MCP_ALLOWED_NETWORKS"] = "127.0.0.1"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deputies.settings")
    import django

    django.setup()
    from sessions.agent.mcp import Connection, ServerConfig, result_text

    server_process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "mcp_server.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(server_process.stdout.readline())
        server = ServerConfig("docs", f"http://127.0.0.1:{port}/mcp", {})

        def check(result, i: int) -> None:
            assert result_text(result) == str(i + 1), result_text(result)

        def fresh(i: int) -> None:
            connection = Connection(server, {})
            try:
                check(connection.call_tool("add", {"a": i, "b": 1}), i)
            finally:
                connection.close()

        kept = Connection(server, {})

        def reused(i: int) -> None:
            check(kept.call_tool("add", {"a": i, "b": 1}), i)

        fresh(0), reused(0)  # warm up: imports, the loop, the server's first request
        before = loadavg()
        results = {
            "calls": args.calls,
            "new_session_per_call": measure(args.calls, fresh, server_process.pid),
            "session_kept_for_the_run": measure(args.calls, reused, server_process.pid),
            "sessions_opened_by_the_kept_connection": kept.opened,
        }
        kept.close()
        results["loadavg_before"], results["loadavg_after"] = before, loadavg()
    finally:
        server_process.kill()
        server_process.wait()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The model client's own cost per call: ``LLMClient.complete()`` against the scripted server.

The scripted server runs in a process of its own, so this process's CPU clock counts only the
client: building and sending the request, reading and parsing the reply. Conversations grow as the
agent loop's do (system prompt, the task, then one assistant tool call and its tool result per step,
the built-in tools' specs on every request), --steps calls each, then a new conversation. Prints JSON
with CPU and wall per call and the machine's load average.

For instruction counts, run it under callgrind twice and subtract (setup and imports cancel out):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/model_call.py --calls 10
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/model_call.py --calls 210

(instructions per call = (Ir of the second - Ir of the first) / 200; valgrind prints Ir as "refs").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentiles  # noqa: E402
from step_overhead import script, serve_model  # noqa: E402

SYSTEM = "You are a coding agent working in a sandboxed checkout of the repository. " * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--steps", type=int, default=40, help="calls per conversation")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    pipe, far_end = spawn.Pipe()
    server = spawn.Process(target=serve_model, args=(script(args.steps, "bash"), far_end), daemon=True)
    server.start()
    if not pipe.poll(60):
        raise SystemExit("the scripted model did not start")
    os.environ["DEPUTIES_LLM_PROVIDERS"] = "scripted"
    os.environ["DEPUTIES_LLM_SCRIPTED_BASE_URL"] = pipe.recv()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deputies.settings")
    os.environ.setdefault("DEPUTIES_LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from sessions.agent.llm import client_for
    from sessions.agent.toolset import Toolset

    tools = Toolset.builtin().specs
    client = client_for("scripted/x")
    cpu: list[float] = []
    wall: list[float] = []
    transcript: list[dict] = []
    try:
        for n in range(args.calls):
            if n % args.steps == 0:
                transcript = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Fix the failing test, conversation {n}."},
                ]
            started, on_cpu = time.perf_counter(), time.process_time()
            response = client.complete(transcript, tools)
            cpu.append((time.process_time() - on_cpu) * 1000)
            wall.append((time.perf_counter() - started) * 1000)
            transcript.append(response.to_message())
            for call in response.tool_calls:
                transcript.append({"role": "tool", "tool_call_id": call.id, "content": "(no output)"})
    finally:
        client.close()
        pipe.send("stop")
        server.join(10)
    print(
        json.dumps(
            {
                "bench": "model_call",
                "calls": args.calls,
                "steps_per_conversation": args.steps,
                "client_cpu_ms_per_call": percentiles(cpu[1:]) if len(cpu) > 1 else None,
                "wall_ms_per_call": percentiles(wall[1:]) if len(wall) > 1 else None,
                "loadavg": os.getloadavg(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

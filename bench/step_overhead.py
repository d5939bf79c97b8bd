"""The control plane's own time per agent step: from the model's answer to the next model request,
less the time the tool itself ran.

Each session's script asks for --steps tool calls (``bash true``, or ``read_file`` with --tool
read_file) one per reply, then ``finish``. Sessions run one after another through the real runner
(``sessions.runner.execute``: Postgres, the local sandbox, the scripted model over real HTTP on
loopback). The scripted server stamps each request's arrival (its ``on_request`` hook); the tool's
own run time is ``Toolset.execute`` timed around the real call. So for step k of a run:

    overhead_k = arrival(request k+1) - arrival(request k) - tool time(call k)

which counts everything the worker does per step: parsing the answer, the LLMCall row, usage and
checkpoint, the tool_started / tool_finished events, the workspace checkpoint (``after_step``), the
heartbeat, building the next request, and the HTTP exchange itself (the scripted server's reply is
a few hundred microseconds of it). Prints JSON with the machine's load average; a shared 2-core
machine moves these figures, so run it a few times.

    .venv/bin/python bench/step_overhead.py [--sessions 5] [--steps 40] [--tool bash|read_file]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault(
    "DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench_steps"
)
import procs  # noqa: E402
from common import percentiles, setup  # noqa: E402

TOOLS = {"bash": {"command": "true"}, "read_file": {"path": "README.md"}}


def script(steps: int, tool: str) -> dict:
    call = {"tool_calls": [{"name": tool, "arguments": TOOLS[tool]}]}
    finish = {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}
    return {"responses": [call] * steps + [finish]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="tool steps per session")
    parser.add_argument("--tool", choices=sorted(TOOLS), default="bash")
    parser.add_argument("--profile", action="store_true", help="add the top functions (cProfile, CPU clock)")
    parser.add_argument(
        "--dump", help="with --profile: write the cProfile stats to this file (pstats, snakeviz)"
    )
    parser.add_argument(
        "--sql", action="store_true", help="add the statements of one step mid-session, with their callers"
    )
    args = parser.parse_args()
    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-steps-"))
    from sessions.agent.fake_llm import start_in_thread

    fake = start_in_thread(script(args.steps, args.tool))
    try:
        os.environ["DEPUTIES_LLM_PROVIDERS"] = "scripted"
        os.environ["DEPUTIES_LLM_SCRIPTED_BASE_URL"] = fake.base_url
        setup(data_dir)
        from sessions.agent.toolset import Toolset
        from sessions.models import Run, start_session
        from sessions.runner import execute

        team, user, repo = procs.bench_repository(data_dir)
        arrivals: list[float] = []
        cpu_at: list[float] = []  # this process's CPU clock at each arrival
        tool_times: list[float] = []
        lock = threading.Lock()

        def on_request(body: dict) -> None:
            with lock:
                arrivals.append(time.perf_counter())
                cpu_at.append(time.process_time())

        real_execute = Toolset.execute

        def timed_execute(self, handle, name, arguments):
            started = time.perf_counter()
            try:
                return real_execute(self, handle, name, arguments)
            finally:
                if name != "finish":
                    tool_times.append(time.perf_counter() - started)

        Toolset.execute = timed_execute
        fake.on_request = on_request

        def one(n: int) -> tuple[str, list[float], list[float]]:
            arrivals.clear()
            cpu_at.clear()
            tool_times.clear()
            session = start_session(
                team=team, repository=repo, prompt=f"step bench {n}", model="scripted/x", created_by=user
            )
            outcome = execute(Run.objects.filter(session=session).values_list("pk", flat=True).get())
            return outcome, list(arrivals), list(tool_times)

        one(-1)  # warm-up: imports, caches, the repository template, prepared statements
        # Per step, whatever the load: statements this process sent and transactions Postgres
        # committed (a whole session's, divided by its steps; the run's own start and end included).
        from django.db import connection

        statements = [0]
        listed: list[tuple[float, str]] = []  # (when, caller and statement) with --sql

        def count(execute_, sql, params, many, context):
            statements[0] += 1
            if args.sql:
                listed.append((time.perf_counter(), f"{procs.caller(6)}: {' '.join(sql.split())[:120]}"))
            return execute_(sql, params, many, context)

        stats = procs.stats_connection()
        transactions_before = procs.pg_transactions(stats, procs.database_name())
        load_before = procs.loadavg()
        overheads: list[float] = []
        cpu: list[float] = []
        tools: list[float] = []
        outcomes: dict[str, int] = {}
        profile = cProfile.Profile(time.process_time) if args.profile else None
        for n in range(args.sessions):
            if profile is not None:
                profile.enable()
            with connection.execute_wrapper(count):
                outcome, times, ran = one(n)
            cpu_at_run = list(cpu_at)
            if profile is not None:
                profile.disable()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if len(times) != args.steps + 1 or len(ran) != args.steps:
                raise SystemExit(f"session {n}: {len(times)} model requests and {len(ran)} tool runs")
            for k in range(args.steps):
                overheads.append((times[k + 1] - times[k] - ran[k]) * 1000)
                cpu.append((cpu_at_run[k + 1] - cpu_at_run[k]) * 1000)
            tools += [t * 1000 for t in ran]
        transactions = procs.pg_transactions(stats, procs.database_name()) - transactions_before
        stats.close()
        steps = args.sessions * args.steps
        report = {}
        if args.sql:  # the last session's middle step: from its model request to the next one
            middle = args.steps // 2
            report["one_step_sql"] = [
                text for when, text in listed if times[middle] <= when < times[middle + 1]
            ]
        if profile is not None:
            if args.dump:
                profile.dump_stats(args.dump)
            stats = pstats.Stats(profile).stats
            top = sorted(stats.items(), key=lambda kv: kv[1][3], reverse=True)[:40]
            report["top_cumulative_ms_per_step"] = {
                f"{Path(k[0]).name}:{k[1]}:{k[2]}": round(v[3] * 1000 / steps, 3) for k, v in top
            }
        print(
            json.dumps(
                {
                    "bench": "step_overhead",
                    "sessions": args.sessions,
                    "steps_per_session": args.steps,
                    "tool": args.tool,
                    "outcomes": outcomes,
                    "overhead_ms": {**percentiles(overheads), "max": round(max(overheads), 3)},
                    "tool_run_ms": percentiles(tools),
                    # Less moved by other work on the machine than the wall figure: the CPU this
                    # process spent per step (the tool's own in-process part and the in-process
                    # scripted server's reply included; bash runs in a child process).
                    "process_cpu_ms_per_step": percentiles(cpu),
                    "statements_per_step": round(statements[0] / steps, 2),
                    "transactions_per_step": round(transactions / steps, 2),
                    "cpus": os.cpu_count(),
                    "loadavg_before": load_before,
                    "loadavg_after": procs.loadavg(),
                    **report,
                },
                indent=2,
            )
        )
    finally:
        fake.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

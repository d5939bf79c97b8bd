"""The control plane's own time per agent step: from the model's answer to the next model request,
less the time the tool itself ran.

Each session's script asks for --steps tool calls (``bash true``, or ``read_file`` with --tool
read_file) one per reply, then ``finish``. Sessions run one after another through the real runner
(``sessions.runner.execute``: Postgres, the local sandbox, the scripted model over real HTTP on
loopback). The scripted server runs in a process of its own (so its threads do not take this
process's CPU or GIL while the worker's code runs, which a real provider would not either) and
stamps each request when its body has arrived and each reply once it is written; the tool's own
run time is ``Toolset.execute`` timed around the real call (for bash: our code around the command
too, reported apart as ``tool_call_outside_process_ms``). So for step k of a run:

    overhead_k = arrival(request k+1) - reply written(request k) - tool time(call k)

which counts everything the worker does per step: reading and parsing the answer, the LLMCall row,
usage and checkpoint, the tool_started / tool_finished events, the workspace checkpoint
(``after_step``), the heartbeat, building and sending the next request; not the scripted server's
own work (``overhead_with_model_server_ms`` adds it back: arrival to arrival, as this bench
measured before). Prints JSON with the machine's load average; a shared 2-core machine moves these
figures, so run it a few times.

    .venv/bin/python bench/step_overhead.py [--sessions 5] [--steps 40] [--tool bash|read_file]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import pstats
import shutil
import sys
import tempfile
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


def serve_model(script_: dict, pipe) -> None:
    """The scripted model in this (spawned) process; per request, (body arrived, reply written) on
    the monotonic clock every process shares. ``pipe``: "stamps" is answered with those since the
    last ask, anything else stops the server."""
    from sessions.agent.fake_llm import FakeLLM, _Handler

    stamps: list[tuple[float, float]] = []

    class Reading:
        def __init__(self, stream, handler) -> None:
            self.stream, self.handler = stream, handler

        def read(self, *args):
            data = self.stream.read(*args)
            self.handler.arrived = time.perf_counter()  # read(n) is the body; headers use readline
            return data

        def __getattr__(self, name: str):
            return getattr(self.stream, name)

    class Stamped(_Handler):
        def setup(self) -> None:
            super().setup()
            self.rfile = Reading(self.rfile, self)

        def _complete(self, body: dict) -> None:
            super()._complete(body)
            stamps.append((self.arrived, time.perf_counter()))

    fake = FakeLLM(script_)
    fake._server.RequestHandlerClass = Stamped
    fake.start()
    pipe.send(fake.base_url)
    while pipe.recv() == "stamps":
        pipe.send(list(stamps))
        stamps.clear()
    fake.close()


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
    spawn = multiprocessing.get_context("spawn")  # not a fork of this process's state
    pipe, far_end = spawn.Pipe()
    model = spawn.Process(target=serve_model, args=(script(args.steps, args.tool), far_end), daemon=True)
    model.start()
    try:
        if not pipe.poll(60):
            raise SystemExit("the scripted model did not start")
        os.environ["DEPUTIES_LLM_PROVIDERS"] = "scripted"
        os.environ["DEPUTIES_LLM_SCRIPTED_BASE_URL"] = pipe.recv()
        setup(data_dir)
        import sandboxes.providers.local as local
        from sessions.agent.llm import LLMClient
        from sessions.agent.toolset import Toolset
        from sessions.models import Run, start_session
        from sessions.runner import execute

        team, user, repo = procs.bench_repository(data_dir)
        cpu_at: list[float] = []  # this process's CPU clock as each model call starts
        tool_times: list[float] = []
        tool_cpu: list[float] = []  # this process's CPU in each tool call
        in_process: list[float] = []  # of each tool call, the time in run_process (spawn to reap)
        inside = [0.0]

        real_complete = LLMClient.complete

        def timed_complete(self, *args, **kwargs):
            cpu_at.append(time.process_time())
            return real_complete(self, *args, **kwargs)

        real_execute = Toolset.execute

        def timed_execute(self, handle, name, arguments):
            started, cpu = time.perf_counter(), time.process_time()
            inside[0] = 0.0
            try:
                return real_execute(self, handle, name, arguments)
            finally:
                if name != "finish":
                    tool_times.append(time.perf_counter() - started)
                    tool_cpu.append(time.process_time() - cpu)
                    in_process.append(inside[0])

        real_run_process = local.run_process

        def timed_run_process(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real_run_process(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - started

        LLMClient.complete = timed_complete
        Toolset.execute = timed_execute
        local.run_process = timed_run_process

        def one(n: int) -> tuple[str, list[tuple[float, float]], list[float]]:
            pipe.send("stamps")
            pipe.recv()  # the previous session's, whatever they were
            cpu_at.clear()
            tool_times.clear()
            tool_cpu.clear()
            in_process.clear()
            session = start_session(
                team=team, repository=repo, prompt=f"step bench {n}", model="scripted/x", created_by=user
            )
            outcome = execute(Run.objects.filter(session=session).values_list("pk", flat=True).get())
            pipe.send("stamps")
            return outcome, pipe.recv(), list(tool_times)

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
        with_server: list[float] = []
        cpu: list[float] = []
        own_cpu: list[float] = []
        tools: list[float] = []
        outside: list[float] = []
        outcomes: dict[str, int] = {}
        profile = cProfile.Profile(time.process_time) if args.profile else None
        for n in range(args.sessions):
            if profile is not None:
                profile.enable()
            with connection.execute_wrapper(count):
                outcome, stamps, ran = one(n)
            if profile is not None:
                profile.disable()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if len(stamps) != args.steps + 1 or len(ran) != args.steps or len(cpu_at) != len(stamps):
                raise SystemExit(f"session {n}: {len(stamps)} model requests and {len(ran)} tool runs")
            times = [arrived for arrived, _ in stamps]  # for --sql
            for k in range(args.steps):
                overheads.append((stamps[k + 1][0] - stamps[k][1] - ran[k]) * 1000)
                with_server.append((stamps[k + 1][0] - stamps[k][0] - ran[k]) * 1000)
                cpu.append((cpu_at[k + 1] - cpu_at[k]) * 1000)
                own_cpu.append((cpu_at[k + 1] - cpu_at[k] - tool_cpu[k]) * 1000)
            tools += [t * 1000 for t in ran]
            outside += [(t - p) * 1000 for t, p in zip(ran, in_process, strict=True) if p]
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
                    "overhead_with_model_server_ms": percentiles(with_server),
                    "tool_run_ms": percentiles(tools),
                    # Of each tool call (inside tool_run_ms, so not in overhead_ms), the time outside
                    # run_process: our code around the command (bash only; empty for others).
                    "tool_call_outside_process_ms": percentiles(outside) if outside else None,
                    # Less moved by other work on the machine than the wall figure: the CPU this
                    # process spent per step, model call to model call (the tool's in-process part
                    # included: for bash the spawn and the wait), and without the tool call's.
                    "process_cpu_ms_per_step": percentiles(cpu),
                    "control_plane_cpu_ms_per_step": percentiles(own_cpu),
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
        pipe.send("stop")
        model.join(10)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Where the CPU of one trivial session goes: the worker's steps, its SQL statements, the API POST.

Runs --sessions trivial sessions (the scripted model's first answer calls ``finish``) in this
process: each is created with ``start_session`` and executed with ``sessions.runner.execute`` under
cProfile (CPU clock); the runner's steps are read from the profile's cumulative times and the
statements are counted with ``connection.execute_wrapper``. The POST side is timed (CPU) through
django's test Client. Prints JSON. Usage: .venv/bin/python bench/profile_session.py [--sessions 50]
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench_perf")
import procs  # noqa: E402
from common import setup  # noqa: E402

SCRIPT = {"responses": [{"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}]}
# (label, file suffix, function name): cumulative CPU of these is the step's.
STEPS = [
    ("provision_sandbox", "sessions/runner.py", "provision_sandbox"),
    ("prepare_repository", "sessions/runner.py", "prepare_repository"),
    ("setup_script", "sessions/runner.py", "run_setup_script"),
    ("agent_loop", "sessions/runner.py", "agent_loop"),
    ("collect_diff", "sessions/runner.py", "collect_diff"),
    ("finish", "sessions/models.py", "finish"),
    ("name_session", "sessions/runner.py", "name_session"),
    ("claim", "sessions/runner.py", "claim"),
    ("events_emit", "sessions/events.py", "emit"),
    ("events_emit_many", "sessions/events.py", "emit_many"),
    ("sql_execute", "django/db/backends/utils.py", "_execute"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument(
        "--sql",
        action="store_true",
        help="also list one session's statements, with the function issuing each",
    )
    parser.add_argument(
        "--dump", help="write the worker's cProfile stats to this file (for pstats, snakeviz)"
    )
    args = parser.parse_args()
    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-profile-"))
    fake = None
    try:
        # The scripted model must be up before settings read its URL.
        fake, fake_url = procs.start_fake_llm(SCRIPT, data_dir)
        os.environ["DEPUTIES_LLM_PROVIDERS"] = "scripted"
        os.environ["DEPUTIES_LLM_SCRIPTED_BASE_URL"] = fake_url
        setup(data_dir)
        from django.db import connection
        from django.test import Client

        from sessions.models import APIToken, Run, start_session
        from sessions.runner import execute

        team, user, repo = procs.bench_repository(data_dir)
        _, secret = APIToken.issue(user, "bench")
        statements = [0]

        def count(execute_, sql, params, many, context):
            statements[0] += 1
            return execute_(sql, params, many, context)

        def one(n: int) -> str:
            session = start_session(
                team=team, repository=repo, prompt=f"p {n}", model="scripted/x", created_by=user
            )
            return execute(Run.objects.filter(session=session).values_list("pk", flat=True).get())

        for n in range(3):  # warm-up: imports, caches, the repository template
            one(n)
        listed: list[dict] = []
        if args.sql:

            def record(execute_, sql, params, many, context):
                backend = context["connection"].connection.info.backend_pid
                before = _on_cpu_ns(backend)
                try:
                    return execute_(sql, params, many, context)
                finally:
                    pg_us = (_on_cpu_ns(backend) - before) / 1000
                    listed.append(
                        {"caller": procs.caller(), "sql": " ".join(sql.split())[:160], "pg_us": pg_us}
                    )

            runs = 10  # each statement's Postgres CPU is the mean over this many sessions
            with connection.execute_wrapper(record):
                for n in range(runs):
                    one(-1 - n)
            per_run = len(listed) // runs
            if per_run * runs == len(listed):
                for i, item in enumerate(listed[:per_run]):
                    item["pg_us"] = round(sum(listed[i + k * per_run]["pg_us"] for k in range(runs)) / runs)
                del listed[per_run:]
        load_before = procs.loadavg()
        stats, name = procs.stats_connection(), procs.database_name()
        pg0 = procs.pg_backend_cpu(stats, name)
        profile = cProfile.Profile(time.process_time)
        outcomes: dict[str, int] = {}
        cpu0, wall0, children0 = time.process_time(), time.monotonic(), os.times()
        with connection.execute_wrapper(count):
            for n in range(args.sessions):
                profile.enable()
                out = one(n)
                profile.disable()
                outcomes[out] = outcomes.get(out, 0) + 1
        cpu, wall, children = time.process_time() - cpu0, time.monotonic() - wall0, os.times()
        # git and sandbox commands: child processes, whose CPU cProfile does not see.
        child_cpu = children.children_user + children.children_system
        child_cpu -= children0.children_user + children0.children_system
        pg_worker = _pg_delta(stats, name, pg0)
        worker_statements = statements[0]

        client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}", HTTP_HOST="127.0.0.1")
        body = {"repository": repo.pk, "prompt": "post", "model": "scripted/x"}
        client.post("/api/v1/sessions", body, content_type="application/json")  # warm-up
        listed_post: list[dict] = []
        if args.sql:
            with connection.execute_wrapper(record):
                n = len(listed)
                client.post("/api/v1/sessions", body, content_type="application/json")
                listed_post, listed[n:] = listed[n:], []
        statements[0] = 0
        post_cpu0, pg0 = time.process_time(), procs.pg_backend_cpu(stats, name)
        codes: dict[int, int] = {}
        with connection.execute_wrapper(count):
            for _ in range(args.sessions):
                code = client.post("/api/v1/sessions", body, content_type="application/json").status_code
                codes[code] = codes.get(code, 0) + 1
        post_cpu = time.process_time() - post_cpu0
        pg_post = _pg_delta(stats, name, pg0)
        stats.close()

        stats = pstats.Stats(profile)
        if args.dump:
            stats.dump_stats(args.dump)
        total = stats.total_tt
        per = 1000 / args.sessions
        steps = {}
        for label, suffix, name in STEPS:
            ct = sum(v[3] for k, v in stats.stats.items() if k[0].endswith(suffix) and k[2] == name)
            steps[label] = {"ms_cpu_per_session": round(ct * per, 2), "pct": round(100 * ct / total, 1)}
        top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
        print(
            json.dumps(
                {
                    "bench": "profile_session",
                    "sessions": args.sessions,
                    "outcomes": outcomes,
                    "worker_cpu_ms_per_session": round(cpu * per, 2),
                    "worker_wall_ms_per_session": round(wall * per, 2),
                    "child_process_cpu_ms_per_session": round(child_cpu * per, 2),
                    "profiled_cpu_ms_per_session": round(total * per, 2),
                    "worker_statements_per_session": round(worker_statements / args.sessions, 1),
                    # This database's Postgres backends (only this process talks to it).
                    "postgres_cpu_ms_per_session": round(pg_worker * per, 2),
                    "steps": steps,
                    "api_post": {
                        "cpu_ms_per_post": round(post_cpu * per, 2),
                        "postgres_cpu_ms_per_post": round(pg_post * per, 2),
                        "statements_per_post": round(statements[0] / args.sessions, 1),
                        "status_codes": codes,
                    },
                    "top_tottime": [
                        {
                            "function": f"{Path(k[0]).name}:{k[1]}:{k[2]}",
                            "tottime_ms_per_session": round(v[2] * per, 2),
                            "calls_per_session": round(v[1] / args.sessions, 1),
                        }
                        for k, v in top
                    ],
                    **({"statements": listed, "post_statements": listed_post} if args.sql else {}),
                    "loadavg_before": load_before,
                    "loadavg_after": procs.loadavg(),
                },
                indent=2,
            )
        )
    finally:
        if fake is not None:
            procs.stop(fake)
        shutil.rmtree(data_dir, ignore_errors=True)


def _pg_delta(stats, name: str, before: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in procs.pg_backend_cpu(stats, name).items())


def _on_cpu_ns(pid: int) -> int:
    """Nanoseconds the process has run on a CPU (/proc/<pid>/schedstat; Postgres runs on this host)."""
    try:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[0])
    except OSError:
        return 0


if __name__ == "__main__":
    main()

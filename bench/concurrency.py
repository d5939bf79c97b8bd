"""Many concurrent runs on few worker processes, on Postgres: time, memory, connections, events.

Starts the scripted model (`deputies fake-llm`, every call answered after --delay seconds) and
`deputies worker` with --workers processes, submits --sessions sessions at once, and samples the
worker processes' RSS (each worker's and the whole tree's) from /proc and the database's connections
from pg_stat_activity until every session has finished. Then it checks what the issue asks for and
prints JSON with a ``checks`` object:

* ``all_completed``: every session completed;
* ``no_event_lost``: every session's events are gap-free from 1, with one ``usage``, one
  ``tool_started`` and one ``tool_finished`` per model call and one ``run_completed`` (the scripted
  run: --calls model calls, each with one tool call, the last one ``finish``), and one successful
  LLMCall row per model call (attempts that timed out or failed are counted as ``model_attempts_not_ok``);
* ``rss_within_limit``: the worker tree's peak RSS (summed at one sample) <= --rss-limit-mb;
* ``pg_connections_within_pool``: the workers' peak connections (counted by ``application_name``,
  so the bench's own are not) <= workers x (DEPUTIES_DB_POOL_SIZE + 1): each process's pool plus
  its queue LISTEN connection.

CPU seconds are reported per part (workers with their git and sandbox commands, the scripted model,
the Postgres backends of the workers' connections): ``cpu_ms_per_run`` is less sensitive to the
machine's load than the wall-clock figures.

The clock starts once every worker process is up (its liveness row written). With --preload (the
default) every session is then submitted in one transaction, so all their runs are queued at the
same instant, at its commit; --no-preload submits them one by one (each its own transaction).

--curve 100,200,500,1000 runs one fresh bench per size (each in its own process, on a fresh
database) and prints them together with a short table. A long --delay (e.g. 30) keeps every run in
flight at once, to see memory and connections at full concurrency.

Usage: .venv/bin/python bench/concurrency.py [--sessions 200 | --curve 100,200,500,1000]
           [--workers 2 --calls 3 --delay 1 --runs-per-worker N --pool-size 10 --rss-limit-mb 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (picks this bench's own database)
from common import setup  # noqa: E402

APP = "deputies-bench-worker"  # PGAPPNAME of the workers' connections


def script(calls: int, delay: float) -> dict:
    work = [{"tool_calls": [{"name": "list_files", "arguments": {}}], "delay": delay}] * (calls - 1)
    finish = {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}], "delay": delay}
    return {"responses": [*work, finish]}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--curve", default="", help="comma-separated session counts, one bench each")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (DEPUTIES_WORKERS)")
    parser.add_argument("--runs-per-worker", type=int, default=0, help="default: sessions / workers")
    parser.add_argument(
        "--pool-size", type=int, default=0, help="DEPUTIES_DB_POOL_SIZE (default: its default)"
    )
    parser.add_argument("--calls", type=int, default=3, help="model calls per run")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds per model call")
    parser.add_argument("--rss-limit-mb", type=float, default=1024, help="the worker tree's RSS budget")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="queue every session before the workers start (clock from there)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse()
    procs.exit_on_sigterm()
    if args.curve:
        curve(args)
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-concurrency-"))
        try:
            print(json.dumps(measure(args, data_dir), indent=2), flush=True)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)  # a sandbox and a checkout per run: takes a while


def curve(args: argparse.Namespace) -> None:
    """One bench per size, each in a process of its own (a fresh database and Django each)."""
    points = []
    passthrough = [
        *("--workers", str(args.workers), "--calls", str(args.calls), "--delay", str(args.delay)),
        *("--rss-limit-mb", str(args.rss_limit_mb), "--timeout", str(args.timeout)),
        *(["--runs-per-worker", str(args.runs_per_worker)] if args.runs_per_worker else []),
        *(["--pool-size", str(args.pool_size)] if args.pool_size else []),
        "--preload" if args.preload else "--no-preload",
    ]
    for size in [int(n) for n in args.curve.split(",") if n.strip()]:
        out = subprocess.run(
            [sys.executable, __file__, "--sessions", str(size), *passthrough],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            points.append({"sessions": size, "error": (out.stderr or out.stdout).strip()[-2000:]})
            continue
        points.append(json.loads(out.stdout))
    table = [
        {
            "sessions": p["sessions"],
            "completion_s": p.get("wall_s"),
            "runs_per_s": p.get("runs_per_s"),
            "max_at_once": p.get("max_runs_running_at_once"),
            "rss_mb_per_worker": p.get("peak_rss_mb_per_worker"),
            "rss_mb_total": p.get("peak_worker_rss_mb"),
            "pg_connections": p.get("peak_pg_connections_of_workers"),
            "events_lost": p.get("events", {}).get("lost"),
            "cpu_ms_per_run": p.get("cpu_ms_per_run"),
            "loadavg": [p.get("loadavg_before", [None])[0], p.get("loadavg_after", [None])[0]],
            "ok": all(p.get("checks", {"error": False}).values()),
        }
        for p in points
    ]
    print(json.dumps({"bench": "concurrency-curve", "table": table, "points": points}, indent=2))


def measure(args: argparse.Namespace, data_dir: Path) -> dict:
    procs.fresh_database()
    setup(data_dir)
    from django.conf import settings
    from django.db import transaction

    from sessions.models import Run, Session, WorkerProcess, start_session

    team, user, repo = procs.bench_repository(data_dir)
    fake, fake_url = procs.start_fake_llm(script(args.calls, args.delay), data_dir)
    per_worker = args.runs_per_worker or math.ceil(args.sessions / args.workers)
    pool_size = args.pool_size or settings.DB_POOL_SIZE
    env = procs.bench_env(
        data_dir,
        fake_url,
        DEPUTIES_WORKERS=str(args.workers),
        DEPUTIES_RUNS_PER_WORKER=str(per_worker),
        DEPUTIES_DB_POOL_SIZE=str(pool_size),
        PGAPPNAME=APP,
    )

    def submit() -> list[int]:
        return [
            start_session(
                team=team,
                repository=repo,
                prompt=f"bench {n} {time.time()}",
                model="scripted/x",
                created_by=user,
            ).pk
            for n in range(args.sessions)
        ]

    load_before = procs.loadavg()
    worker = procs.start([procs.DEPUTIES, "worker"], env, data_dir / "worker.log")
    try:
        # Up: each worker process has written its liveness row, i.e. Django is loaded and its loop runs.
        procs.wait_until(lambda: WorkerProcess.objects.count() >= args.workers, 60, "workers")
        cpu_before = {
            "workers": procs.cpu_seconds(procs.tree(worker.pid)),
            "fake_llm": procs.cpu_seconds([fake.pid]),
        }
        idle_rss = procs.rss_kb(procs.tree(worker.pid))
        sampler = procs.Sampler([worker.pid], app=APP)
        sampler.start()
        t_submit = time.monotonic()
        if args.preload:  # one transaction: every run's queue row appears at its commit
            with transaction.atomic():
                ids = submit()
        else:
            ids = submit()
        submitted = time.monotonic() - t_submit
        t0 = time.monotonic() if args.preload else t_submit  # the clock: the commit, or the first submit
        done = Session.objects.filter(pk__in=ids, status__in=("completed", "failed", "cancelled"))
        procs.wait_until(
            lambda: done.count() == len(ids), args.timeout, "every session to finish", interval=0.5
        )
        wall = time.monotonic() - t0
        load_after = procs.loadavg()
        peaks = sampler.stop()
        cpu = {
            "workers": procs.cpu_seconds(procs.tree(worker.pid)) - cpu_before["workers"],
            "fake_llm": procs.cpu_seconds([fake.pid]) - cpu_before["fake_llm"],
            "postgres_backends": postgres_cpu(),
        }
        runs = Run.objects.filter(session_id__in=ids)
        completed = Session.objects.filter(pk__in=ids, status="completed").count()
        first = min(r.started for r in runs if r.started)
        last = max(r.finished for r in runs if r.finished)
        overlap = _max_overlap([(r.started, r.finished) for r in runs if r.started and r.finished])
        events = check_events(ids, args.calls)
        connection_bound = args.workers * (pool_size + 1)
        return {
            "bench": "concurrency",
            "database": "postgresql",
            "sessions": args.sessions,
            "worker_processes": args.workers,
            "runs_per_worker": per_worker,
            "db_pool_size": pool_size,
            "model_calls_per_run": args.calls,
            "model_delay_s": args.delay,
            "completed": completed,
            "preloaded": args.preload,
            "submit_s": round(submitted, 2),
            "idle_worker_rss_mb": round(idle_rss / 1024, 1),
            "wall_s": round(wall, 2),
            "runs_per_s": round(args.sessions / wall, 1),
            "first_start_to_last_finish_s": round((last - first).total_seconds(), 2),
            "max_runs_running_at_once": overlap,
            **peaks,
            "pg_connection_bound": connection_bound,
            "pg_max_connections": _max_connections(),
            "events": events,
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "cpu_ms_per_run": round(1000 * sum(cpu.values()) / args.sessions, 1),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "checks": {
                "all_completed": completed == len(ids),
                "no_event_lost": events["lost"] == 0 and events["duplicated"] == 0,
                "rss_within_limit": peaks["peak_worker_rss_mb"] <= args.rss_limit_mb,
                "pg_connections_within_pool": peaks["peak_pg_connections_of_workers"] <= connection_bound,
            },
        }
    finally:
        procs.stop(worker)
        procs.stop(fake)


def check_events(ids: list[int], calls: int) -> dict:
    """Per session: events gap-free from 1, and one usage/tool_started/tool_finished per model call,
    one run_completed, one successful LLMCall row per call. Counts what is missing and what is there twice."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT s.id,
                   count(e.id), coalesce(max(e.seq), 0), coalesce(min(e.seq), 1),
                   count(*) FILTER (WHERE e.type = 'usage'),
                   count(*) FILTER (WHERE e.type = 'tool_started'),
                   count(*) FILTER (WHERE e.type = 'tool_finished'),
                   count(*) FILTER (WHERE e.type = 'run_completed'),
                   (SELECT count(*) FROM agent_sessions_llmcall c WHERE c.session_id = s.id AND c.outcome = 'ok')
            FROM agent_sessions_session s LEFT JOIN agent_sessions_event e ON e.session_id = s.id
            WHERE s.id = ANY(%s) GROUP BY s.id
            """,
            [ids],
        )
        rows = cursor.fetchall()
        cursor.execute(
            "SELECT count(*) FROM agent_sessions_llmcall WHERE session_id = ANY(%s) AND outcome <> 'ok'",
            [ids],
        )
        retries = cursor.fetchone()[0]
    lost = duplicated = bad_sessions = 0
    for _, count, high, low, *kinds in rows:
        expected = [calls, calls, calls, 1, calls]
        missing = (
            (high - count) + (low - 1) + sum(max(0, e - k) for e, k in zip(expected, kinds, strict=True))
        )
        extra = sum(max(0, k - e) for e, k in zip(expected, kinds, strict=True))
        lost += missing
        duplicated += extra
        bad_sessions += bool(missing or extra)
    return {
        "sessions_checked": len(rows),
        "events": sum(r[1] for r in rows),
        "lost": lost + (len(ids) - len(rows)) * (3 * calls + 1),
        "duplicated": duplicated,
        "sessions_with_problems": bad_sessions,
        "model_attempts_not_ok": retries,  # timeouts and errors the client retried
    }


def postgres_cpu() -> float:
    """CPU of the Postgres backends serving the workers' connections (pooled: they live as long as
    the workers, so nearly all of the database's work for the runs is counted)."""
    with procs.stats_connection() as conn:
        return procs.cpu_seconds(procs.pg_backend_pids(conn, procs.database_name(), APP))


def _max_connections() -> int:
    with procs.stats_connection() as conn:
        return int(conn.execute("SHOW max_connections").fetchone()[0])


def _max_overlap(spans) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


if __name__ == "__main__":
    main()

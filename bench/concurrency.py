"""Many concurrent runs on few worker processes, on Postgres: memory, connections, wall time.

Starts the scripted model (`deputies fake-llm`, every call answered after --delay seconds) and
`deputies worker` with --workers processes, submits --sessions sessions at once, and samples the
worker process tree's summed RSS (and PSS) from /proc and the database's connections from
pg_stat_activity until every session has finished. Prints JSON.
With --preload the sessions are queued before the workers start, so submitting them (serially, from
this process) does not pace the runs; the clock then starts with the workers.
Usage: .venv/bin/python bench/concurrency.py [--sessions 200 --workers 2 --calls 3 --delay 1 --preload]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (picks this bench's own database)
from common import setup  # noqa: E402


def script(calls: int, delay: float) -> dict:
    work = [{"tool_calls": [{"name": "list_files", "arguments": {}}], "delay": delay}] * (calls - 1)
    finish = {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}], "delay": delay}
    return {"responses": [*work, finish]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (DEPUTIES_WORKERS)")
    parser.add_argument("--runs-per-worker", type=int, default=0, help="default: sessions / workers")
    parser.add_argument("--calls", type=int, default=3, help="model calls per run")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds per model call")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--preload",
        action="store_true",
        help="queue every session before the workers start (clock from there)",
    )
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-concurrency-"))
    setup(data_dir)
    from sessions.models import Run, Session, start_session

    team, user, repo = procs.bench_repository(data_dir)
    fake, fake_url = procs.start_fake_llm(script(args.calls, args.delay), data_dir)
    per_worker = args.runs_per_worker or math.ceil(args.sessions / args.workers)
    env = procs.bench_env(
        data_dir,
        fake_url,
        DEPUTIES_WORKERS=str(args.workers),
        DEPUTIES_RUNS_PER_WORKER=str(per_worker),
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

    ids: list[int] = []
    t_pre = time.monotonic()
    if args.preload:  # queue everything first: the worker starts with the whole backlog waiting
        ids = submit()
    preloaded = time.monotonic() - t_pre
    worker = procs.start([procs.DEPUTIES, "worker"], env, data_dir / "worker.log")
    try:
        procs.wait_until(
            lambda: len(procs.tree(worker.pid)) >= (args.workers + (args.workers > 1)), 20, "workers"
        )
        if not args.preload:
            time.sleep(3)  # the worker processes finish importing Django before the clock starts
        idle = procs.rss_kb(procs.tree(worker.pid))
        sampler = procs.Sampler([worker.pid])
        sampler.start()
        load_before = procs.loadavg()
        t0 = time.monotonic()
        if not args.preload:
            ids = submit()
        submitted = preloaded if args.preload else time.monotonic() - t0
        done = Session.objects.filter(pk__in=ids, status__in=("completed", "failed", "cancelled"))
        procs.wait_until(
            lambda: done.count() == len(ids), args.timeout, "every session to finish", interval=0.5
        )
        wall = time.monotonic() - t0
        load_after = procs.loadavg()
        peaks = sampler.stop()
        runs = Run.objects.filter(session_id__in=ids)
        completed = Session.objects.filter(pk__in=ids, status="completed").count()
        first = min(r.started for r in runs if r.started)
        last = max(r.finished for r in runs if r.finished)
        overlap = _max_overlap([(r.started, r.finished) for r in runs if r.started and r.finished])
        print(
            json.dumps(
                {
                    "bench": "concurrency",
                    "database": "postgresql",
                    "sessions": args.sessions,
                    "worker_processes": args.workers,
                    "runs_per_worker": per_worker,
                    "model_calls_per_run": args.calls,
                    "model_delay_s": args.delay,
                    "completed": completed,
                    "all_completed": completed == len(ids),
                    "preloaded": args.preload,
                    "submit_s": round(submitted, 2),
                    "wall_s": round(wall, 2),
                    "first_start_to_last_finish_s": round((last - first).total_seconds(), 2),
                    "max_runs_running_at_once": overlap,
                    "idle_worker_rss_mb": round(idle / 1024, 1),
                    **peaks,
                    "pg_max_connections": _max_connections(),
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                },
                indent=2,
            )
        )
    finally:
        procs.stop(worker)
        procs.stop(fake)
        shutil.rmtree(data_dir, ignore_errors=True)


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

"""Trivial sessions per second, end to end, on Postgres: submitted, run, completed.

The scripted model's first answer just calls ``finish``, so a session is all overhead: the POST
(daphne, `deputies web`), the queue, the claim, the sandbox, the repository, one model call, the diff
and the bookkeeping. --submit api posts from --clients threads; --submit direct calls
``start_session`` in this process (the worker side alone). Prints JSON.
Usage: .venv/bin/python bench/throughput.py [--sessions 300 --workers 2 --submit api]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (picks this bench's own database)
from common import setup  # noqa: E402

SCRIPT = {"responses": [{"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (DEPUTIES_WORKERS)")
    parser.add_argument("--submit", choices=("api", "direct"), default="api")
    parser.add_argument("--clients", type=int, default=8, help="concurrent API clients")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-throughput-"))
    setup(data_dir)
    import httpx
    from django.db import connection

    from sessions.models import APIToken, Session, start_session

    team, user, repo = procs.bench_repository(data_dir)
    _, secret = APIToken.issue(user, "bench")
    fake, fake_url = procs.start_fake_llm(SCRIPT, data_dir)
    env = procs.bench_env(data_dir, fake_url, DEPUTIES_WORKERS=str(args.workers))
    port = procs.free_port()
    web = procs.start(
        [procs.DEPUTIES, "web", "--host", "127.0.0.1", "--port", str(port)], env, data_dir / "web.log"
    )
    worker = procs.start([procs.DEPUTIES, "worker"], env, data_dir / "worker.log")
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        procs.wait_until(lambda: _ok(base), 30, "the web server")
        # Warm-up: a few sessions through every process, so imports and pools are not measured.
        warm = [_post(httpx.Client(base_url=base, headers=headers), repo.pk, f"warm {n}") for n in range(4)]
        procs.wait_until(
            lambda: Session.objects.filter(pk__in=warm, status="completed").count() == len(warm),
            60,
            "warm-up",
        )
        connection.close()
        ids: list[int] = []
        lock = threading.Lock()
        stats = procs.stats_connection()
        name = procs.database_name()
        roots = {"web": web.pid, "worker": worker.pid, "model": fake.pid}
        cpu0 = {k: procs.cpu_seconds(procs.tree(pid)) for k, pid in roots.items()}
        pg0 = procs.pg_backend_cpu(stats, name)
        xact0 = _transactions(stats, name)
        load_before = procs.loadavg()
        t0 = time.monotonic()
        if args.submit == "direct":
            ids = [
                start_session(
                    team=team, repository=repo, prompt=f"t {n}", model="scripted/x", created_by=user
                ).pk
                for n in range(args.sessions)
            ]
        else:
            counter = iter(range(args.sessions))

            def client() -> None:
                with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
                    for n in counter:  # shared iterator: each number is posted once
                        sid = _post(http, repo.pk, f"t {n}")
                        with lock:
                            ids.append(sid)

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        submitted = time.monotonic() - t0
        done = Session.objects.filter(pk__in=ids, status__in=("completed", "failed", "cancelled"))
        procs.wait_until(
            lambda: done.count() == len(ids), args.timeout, "every session to finish", interval=0.1
        )
        wall = time.monotonic() - t0
        load_after = procs.loadavg()
        # CPU per session of each process tree, and of this database's Postgres backends (those
        # connected at the end: the pools keep theirs).
        per = 1000 / max(1, len(ids))
        cpu = {k: round((procs.cpu_seconds(procs.tree(pid)) - cpu0[k]) * per, 2) for k, pid in roots.items()}
        pg = procs.pg_backend_cpu(stats, name)
        cpu["postgres"] = round(sum(v - pg0.get(pid, 0.0) for pid, v in pg.items()) * per, 2)
        transactions = round((_transactions(stats, name, settled=True) - xact0) / max(1, len(ids)), 1)
        stats.close()
        completed = Session.objects.filter(pk__in=ids, status="completed").count()
        print(
            json.dumps(
                {
                    "bench": "throughput",
                    "database": "postgresql",
                    "submit": args.submit,
                    "clients": args.clients if args.submit == "api" else 0,
                    "sessions": args.sessions,
                    "worker_processes": args.workers,
                    "completed": completed,
                    "submit_s": round(submitted, 2),
                    "submitted_per_s": round(len(ids) / submitted, 1),
                    "wall_s": round(wall, 2),
                    "sessions_per_s": round(completed / wall, 1),
                    "cpu_ms_per_session": cpu,  # the bench's own API clients are not counted
                    # Commits and rollbacks in the bench database (its own polling included).
                    "transactions_per_session": transactions,
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                },
                indent=2,
            )
        )
    finally:
        procs.stop(worker)
        procs.stop(web)
        procs.stop(fake)
        shutil.rmtree(data_dir, ignore_errors=True)


def _transactions(stats, name: str, settled: bool = False) -> int:
    """The database's commits and rollbacks so far. Backends report theirs about once a second, so
    ``settled`` reads until two reads a report interval apart agree."""
    sql = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s"
    last = None
    while True:
        stats.execute("SELECT pg_stat_clear_snapshot()")
        now = stats.execute(sql, [name]).fetchone()[0]
        if not settled or now == last:
            return now
        last = now
        time.sleep(1.1)


def _post(http, repository: int, prompt: str) -> int:
    r = http.post(
        "/api/v1/sessions", json={"repository": repository, "prompt": prompt, "model": "scripted/x"}
    )
    r.raise_for_status()
    return r.json()["id"]


def _ok(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()

"""An idle deployment on Postgres: memory and database transactions while nothing happens.

Starts `deputies web` and `deputies worker` (what `deputies up` runs, on Postgres), warms them up
with one session through the API, then for --seconds samples the summed RSS (and PSS) of both
process trees and counts xact_commit + xact_rollback of the database in pg_stat_database. Then it
stops the worker and counts again for the web process alone (its stream hub's safety poll).
Prints JSON.
Usage: .venv/bin/python bench/idle.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (picks this bench's own database)
from common import setup  # noqa: E402

SAMPLE_S = 1.0  # memory is sampled this often during a measured window
SCRIPT = {"responses": [{"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}]}


def measure(roots: list[int], seconds: float) -> dict:
    name = procs.database_name()
    samples = []
    with procs.stats_connection() as conn:
        before = procs.pg_transactions(conn, name)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            pids = [p for root in roots for p in procs.tree(root)]
            samples.append((procs.rss_kb(pids), procs.pss_kb(pids)))
            time.sleep(SAMPLE_S)
        elapsed = time.monotonic() - t0
        time.sleep(procs.STATS_FLUSH_S)
        after = procs.pg_transactions(conn, name)
    rss = [s[0] for s in samples]
    return {
        "seconds": round(elapsed, 1),
        "rss_mb_mean": round(statistics.fmean(rss) / 1024, 1),
        "rss_mb_max": round(max(rss) / 1024, 1),
        "pss_mb_mean": round(statistics.fmean(s[1] for s in samples) / 1024, 1),
        "processes": len([p for root in roots for p in procs.tree(root)]),
        "transactions": after - before,
        "transactions_per_s": round((after - before) / elapsed, 2),
        "loadavg": procs.loadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--settle", type=float, default=10, help="seconds after the warm-up session")
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-idle-"))
    setup(data_dir)
    import httpx
    from django.db import connection

    from sessions.models import APIToken, Session

    _, user, repo = procs.bench_repository(data_dir)
    _, secret = APIToken.issue(user, "bench")
    fake, fake_url = procs.start_fake_llm(SCRIPT, data_dir)
    env = procs.bench_env(data_dir, fake_url)  # every other setting at its default
    port = procs.free_port()
    web = procs.start(
        [procs.DEPUTIES, "web", "--host", "127.0.0.1", "--port", str(port)], env, data_dir / "web.log"
    )
    worker = procs.start([procs.DEPUTIES, "worker"], env, data_dir / "worker.log")
    base = f"http://127.0.0.1:{port}"
    try:
        procs.wait_until(lambda: _ok(base), 30, "the web server")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}) as http:
            r = http.post(
                "/api/v1/sessions", json={"repository": repo.pk, "prompt": "warm", "model": "scripted/x"}
            )
            r.raise_for_status()
            sid = r.json()["id"]
            procs.wait_until(
                lambda: Session.objects.filter(pk=sid, status="completed").exists(), 60, "the warm-up session"
            )
            http.get(f"/api/v1/sessions/{sid}/events")
        connection.close()  # this process stays out of the counts
        time.sleep(args.settle)
        both = measure([web.pid, worker.pid], args.seconds)
        procs.stop(worker)
        web_only = measure([web.pid], min(args.seconds, 15))
        print(
            json.dumps(
                {
                    "bench": "idle",
                    "database": "postgresql",
                    "web_and_worker": both,
                    "web_only": web_only,
                    "targets": {"rss_mb": 200, "transactions_per_s": 5},
                },
                indent=2,
            )
        )
    finally:
        procs.stop(worker)
        procs.stop(web)
        procs.stop(fake)
        shutil.rmtree(data_dir, ignore_errors=True)


def _ok(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()

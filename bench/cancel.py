"""Cancel in flight: how fast a cancel kills a running command, and what watching for it costs.

Starts a real `deputies worker` on Postgres (local sandboxes), counts the database's transactions
while it is idle, then starts --sessions sessions whose scripted model asks for a long `sleep`,
counts transactions again while all those commands run (the cancel watcher's polling), then cancels
the sessions one by one (``Session.cancel``, what the API and the admin call) and times each from the
commit of the cancel until the command's last process is gone. Prints JSON.
Usage: .venv/bin/python bench/cancel.py [--sessions 10] [--seconds 10] [--isolation auto|none|bwrap]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (picks this bench's own database)
from common import percentiles, setup  # noqa: E402


def transactions_per_s(seconds: float) -> float:
    name = procs.database_name()
    with procs.stats_connection() as conn:
        before = procs.pg_transactions(conn, name)
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        time.sleep(procs.STATS_FLUSH_S)
        after = procs.pg_transactions(conn, name)
    return round((after - before) / elapsed, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--settle", type=float, default=15, help="seconds between the worker's first heartbeat and counting"
    )
    parser.add_argument("--isolation", default="auto", choices=["auto", "none", "bwrap"])
    parser.add_argument("--poll", default="0.5", help="DEPUTIES_CANCEL_POLL for the worker")
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-cancel-"))
    setup(data_dir)
    from django.db import connection
    from django.utils import timezone

    from sessions.models import Environment, Run, Session, start_session
    from tests.sandbox_contract import live_processes_with

    team, user, repo = procs.bench_repository(data_dir)
    markers = [f"200.{secrets.randbelow(10**8):08d}" for _ in range(args.sessions)]
    # One conversation per session (the prompt differs), each asking for its own sleep.
    script = {
        "responses": [
            {
                "tool_calls": [
                    {"name": "bash", "arguments": {"command": "sleep $(cat .marker 2>/dev/null || echo 300)"}}
                ]
            }
        ]
    }
    fake, fake_url = procs.start_fake_llm(script, data_dir)
    env = procs.bench_env(
        data_dir, fake_url, DEPUTIES_SANDBOX_ISOLATION=args.isolation, DEPUTIES_CANCEL_POLL=args.poll
    )
    launched = timezone.now()
    worker = procs.start([procs.DEPUTIES, "worker"], env, data_dir / "worker.log")
    try:
        procs.wait_for_workers(launched)
        time.sleep(args.settle)  # its start-up work (first schedules, recovery checks) dies down
        idle = transactions_per_s(args.seconds)
        sessions = []
        for marker in markers:
            # The environment's setup script writes the marker, so every sleep is findable in /proc.
            environment = Environment.objects.create(
                team=team, name=f"bench-{marker}", setup_script=f"echo {marker} > .marker"
            )
            sessions.append(
                start_session(
                    team=team,
                    repository=repo,
                    environment=environment,
                    prompt=f"Wait {marker}",
                    model="scripted/demo",
                    created_by=user,
                )
            )
        for marker in markers:
            procs.wait_until(lambda m=marker: live_processes_with(f"sleep {m}"), 120, f"sleep {marker}")
        connection.close()  # this process stays out of the counts
        busy = transactions_per_s(args.seconds)
        latencies = []
        for session, marker in zip(sessions, markers, strict=True):
            Session.objects.get(pk=session.pk).cancel()
            started = time.monotonic()
            procs.wait_until(lambda m=marker: not live_processes_with(f"sleep {m}"), 30, "the kill", 0.01)
            latencies.append(time.monotonic() - started)
        procs.wait_until(
            lambda: (
                Run.objects.filter(session__in=sessions, status=Run.Status.CANCELLED).count() == len(sessions)
            ),
            30,
            "every run cancelled",
        )
        left = [m for m in markers if live_processes_with(m)]
        print(
            json.dumps(
                {
                    "bench": "cancel",
                    "database": "postgresql",
                    "isolation": args.isolation,
                    "cancel_poll_s": float(args.poll),
                    "sessions": args.sessions,
                    "idle_worker_transactions_per_s": idle,
                    "transactions_per_s_while_commands_run": busy,
                    "cancel_to_process_gone_s": percentiles(latencies),
                    "max_s": round(max(latencies), 3),
                    "processes_left": len(left),
                    "targets": {"cancel_to_process_gone_s": 2, "idle_transactions_per_s": 5},
                },
                indent=2,
            )
        )
    finally:
        procs.stop(worker)
        procs.stop(fake)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Crash recovery: kill -9 a worker during N runs; how fast and how cleanly do the runs resume?

Starts the scripted model (`deputies fake-llm`, a plan of --steps commands that each append their own
line to a file in the workspace, then `finish`) and two `deputies worker` processes, submits --runs
sessions, and at seeded random moments SIGKILLs the worker holding the most running runs, starting it
again at once (what a supervisor does). Every run of a killed worker must resume, on either worker,
from its checkpoint. Prints JSON:

* ``kill_to_resumed_s``: from the kill to each of its runs' ``run_resumed`` event (p50, max);
  the bound is the lease (DEPUTIES_RUN_LEASE, --lease) plus the workers' check interval;
* ``commands_redone``: planned commands that ran twice (0: a command in flight is closed as
  interrupted, never run again); ``commands_interrupted``: those closed so;
* ``model_calls_redone``: model requests beyond the plan (at most one per kill that hit the run
  while the model was answering);
* ``events_lost`` (gaps in a session's sequence, tool calls started and never closed) and
  ``events_duplicated`` (a tool call started or closed twice, a second ``run_completed``): must be 0.

Usage: .venv/bin/python bench/recovery.py [--runs 20 --kills 3 --steps 5 --lease 15 --seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# A database of its own, so it runs beside the other worker benches.
os.environ.setdefault(
    "DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench_recovery"
)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402
from common import percentiles, setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="commands in the plan (then finish)")
    parser.add_argument("--model-delay", type=float, default=0.5)
    parser.add_argument("--command-delay", type=float, default=0.5)
    parser.add_argument("--lease", type=int, default=15, help="DEPUTIES_RUN_LEASE, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-recovery-"))
    setup(data_dir)
    from django.db.models import Min
    from django.utils import timezone

    from sandboxes.models import Sandbox
    from sessions.agent.fake_llm import conversation_key
    from sessions.models import Event, Run, Session, start_session
    from tests.test_resume import plan  # the plan the resume tests run

    rng = random.Random(args.seed)
    team, user, repo = procs.bench_repository(data_dir)
    fake, fake_url = procs.start_fake_llm(plan(args.steps, args.model_delay, args.command_delay), data_dir)
    sandbox_root = data_dir / "sandboxes"
    env = procs.bench_env(
        data_dir,
        fake_url,
        DEPUTIES_WORKERS="1",
        DEPUTIES_RUNS_PER_WORKER=str(args.runs),
        DEPUTIES_RUN_LEASE=str(args.lease),
        DEPUTIES_SANDBOX_ROOT=str(sandbox_root),
        DEPUTIES_SANDBOX_ISOLATION="none",
    )
    starts = Counter()

    def start_worker(name: str):
        starts[name] += 1
        return procs.start([procs.DEPUTIES, "worker"], env, data_dir / f"{name}-{starts[name]}.log")

    launched = timezone.now()
    workers = {"a": start_worker("a"), "b": start_worker("b")}
    kills: list[tuple[float, set[int]]] = []  # (wall time of the kill, the runs it took down)
    try:
        procs.wait_for_workers(launched, count=len(workers))  # Django imported before the clock starts
        ids = [
            start_session(
                team=team,
                repository=repo,
                prompt=f"recovery {n} {time.time()}",
                model="scripted/x",
                created_by=user,
            ).pk
            for n in range(args.runs)
        ]
        t0 = time.monotonic()
        procs.wait_until(
            lambda: (
                Event.objects.filter(session_id__in=ids, type="usage").values("session_id").distinct().count()
                == len(ids)
            ),
            60,
            "every run to be in its agent loop",
        )
        for _ in range(args.kills):
            time.sleep(rng.uniform(0.3, 2.0))  # the seeded kill schedule
            live = {p.pid: n for n, p in workers.items()}
            owners = Counter(
                owner
                for owner in Run.objects.filter(session_id__in=ids, status="running").values_list(
                    "lease_owner", flat=True
                )
                if int(owner.rsplit(":", 1)[1]) in live  # not the runs of a worker killed already
            )
            if not owners:
                break
            owner = owners.most_common(1)[0][0]
            pid = int(owner.rsplit(":", 1)[1])
            name = live[pid]
            victims = set(
                Run.objects.filter(session_id__in=ids, status="running", lease_owner=owner).values_list(
                    "pk", flat=True
                )
            )
            os.kill(pid, signal.SIGKILL)
            killed_at = time.time()
            workers[name].wait()
            kills.append((killed_at, victims))
            workers[name] = start_worker(name)  # the supervisor
            # The next kill once these runs are back (each kill then takes running runs down).
            procs.wait_until(
                lambda v=victims, owner=owner: (
                    not Run.objects.filter(pk__in=v, lease_owner=owner, status="running").exists()
                ),
                args.timeout,
                "the killed worker's runs to be recovered",
                interval=0.25,
            )
        done = Session.objects.filter(pk__in=ids, status__in=("completed", "failed", "cancelled"))
        procs.wait_until(lambda: done.count() == len(ids), args.timeout, "every run to finish", interval=0.25)
        wall = time.monotonic() - t0
        import httpx

        requests = httpx.get(fake_url.removesuffix("/v1") + "/_requests", timeout=10).json()
        requests = [r for r in requests if isinstance(r["body"], dict)]  # not those cut off by a kill
    finally:
        for proc in workers.values():
            procs.stop(proc)
        procs.stop(fake)

    latencies = []
    for killed_at, victims in kills:
        for run_id in victims:
            resumed = Event.objects.filter(
                run_id=run_id, type="run_resumed", created__gte=_aware(killed_at)
            ).aggregate(first=Min("created"))["first"]
            if resumed is not None:
                latencies.append(resumed.timestamp() - killed_at)
    asked = Counter(conversation_key(r["body"]["messages"]) for r in requests)
    keys = {}
    for r in requests:
        user_text = r["body"]["messages"][1]["content"]
        keys.setdefault(user_text, conversation_key(r["body"]["messages"]))
    planned = args.steps + 1
    redone_calls = redone_commands = interrupted = lost = duplicated = 0
    resumes = counted_calls = 0
    for sid in ids:
        session = Session.objects.get(pk=sid)
        events = list(Event.objects.filter(session_id=sid).order_by("seq"))
        seqs = [e.seq for e in events]
        lost += len(set(range(1, seqs[-1] + 1)) - set(seqs))
        started = Counter(e.payload.get("call_id") for e in events if e.type == "tool_started")
        closed = Counter(e.payload.get("call_id") for e in events if e.type == "tool_finished")
        lost += sum(1 for call in started if call not in closed)
        duplicated += sum(n - 1 for n in started.values() if n > 1) + sum(
            n - 1 for n in closed.values() if n > 1
        )
        duplicated += max(0, [e.type for e in events].count("run_completed") - 1)
        interrupted += sum(1 for e in events if e.type == "tool_finished" and e.payload.get("interrupted"))
        resumes += sum(1 for e in events if e.type == "run_resumed")
        key = keys.get(session.messages.get(position=1).content)
        if key is not None:  # else its requests are older than the scripted model's recording keeps
            counted_calls += 1
            redone_calls += max(0, asked[key] - planned)
        sandbox = Sandbox.objects.filter(session_id=sid, status="ready").first()
        log = sandbox_root / sandbox.external_id / "workspace" / "plan.log" if sandbox else None
        lines = Counter(log.read_text().split()) if log and log.exists() else Counter()
        redone_commands += sum(n - 1 for n in lines.values() if n > 1)
    completed = Session.objects.filter(pk__in=ids, status="completed").count()
    print(
        json.dumps(
            {
                "bench": "recovery",
                "database": "postgresql",
                "runs": args.runs,
                "kills": len(kills),
                "runs_killed": sum(len(v) for _, v in kills),  # a run killed twice counts twice
                "runs_resumed": resumes,  # run_resumed events: one per run killed, when all is well
                "completed": completed,
                "all_completed": completed == len(ids),
                "lease_s": args.lease,
                "kill_to_resumed_s": {**percentiles(latencies), "max": round(max(latencies), 3)}
                if latencies
                else None,
                "commands_redone": redone_commands,
                "commands_interrupted": interrupted,
                "model_calls_planned": planned * len(ids),
                "model_calls_redone": redone_calls,
                "model_calls_counted_for_runs": counted_calls,  # the model records its last 500 requests
                "events_lost": lost,
                "events_duplicated": duplicated,
                "wall_s": round(wall, 2),
                "loadavg": procs.loadavg(),
            },
            indent=2,
        )
    )
    shutil.rmtree(data_dir, ignore_errors=True)


def _aware(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


if __name__ == "__main__":
    main()

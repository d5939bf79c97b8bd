"""Event ingest: events per second stored through emit(), each durable when its emit() returns.

"Ingest" here is N emitters in one process (threads: the runs on one worker's run pool), each calling
emit() for its own session as fast as it can, one event per call, every call returning only after
its row is committed (synchronous_commit on), measured over all N from start to the last return.
Reported for N = 1, 20 and 100, each with group commit on (the default: concurrent emits of a
process share one statement and commit) and off (one statement and commit per emit), plus one
emitter calling emit_many() with batches of 100 (how bulky output should be written). Each figure
comes with the CPU it cost per event, in this process and in its Postgres backends (from /proc),
which other work on the machine moves much less than events/s. Prints JSON with the machine's load
average, since other work on a 2-core machine moves these numbers.

    .venv/bin/python bench/events.py [--events 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup  # noqa: E402


def make_sessions(n: int) -> list[int]:
    from sessions.models import Repository, Session, Team

    team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    repo, _ = Repository.objects.get_or_create(team=team, name="bench", defaults={"url": "/tmp/none"})
    return [
        Session.objects.create(team=team, repository=repo, base_branch="main", model="scripted/demo").pk
        for _ in range(n)
    ]


def emit_loop(session_id: int, count: int, batch: int = 1) -> None:
    from django.db import connection

    from sessions.events import emit, emit_many

    payload = {"call_id": "c1", "name": "bash", "ok": True, "output": "x" * 200, "truncated": False}
    if batch == 1:
        for _ in range(count):
            emit(session_id, "tool_finished", payload)
    else:
        for _ in range(count // batch):
            emit_many(session_id, [("tool_finished", payload)] * batch)
    connection.close()


def backends_cpu_s() -> float:
    """CPU seconds used so far by the bench database's Postgres backends (same host: /proc)."""
    import psycopg
    from django.db import connection

    settings = connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"], port=settings["PORT"] or 5432, user=settings["USER"], dbname="postgres",
        password=settings["PASSWORD"] or None, autocommit=True,
    ) as conn:  # fmt: skip
        pids = [
            r[0]
            for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", [settings["NAME"]])
        ]
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone, or not on this host
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def vacuum() -> None:
    """Every emit updates its session's row: without autovacuum (CI's Postgres runs with it off) the
    dead versions pile up from one measurement to the next and each one is slower than the last."""
    from django.db import connection

    from sessions.models import Session

    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM {Session._meta.db_table}")


def measure(sessions: list[int], per_run: int, batch: int = 1) -> dict:
    vacuum()
    threads = [threading.Thread(target=emit_loop, args=(s, per_run, batch)) for s in sessions]
    total = len(sessions) * per_run
    pg_before, cpu_before = backends_cpu_s(), time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    # Backends that ended during the run (a pooled connection closed) are not counted: a floor.
    pg = backends_cpu_s() - pg_before
    return {
        "events_per_s": round(total / elapsed, 1),
        "process_cpu_us_per_event": round(cpu / total * 1e6, 1),
        "postgres_cpu_us_per_event": round(pg / total * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000, help="events per measurement")
    args = parser.parse_args()
    setup()
    from django.conf import settings
    from django.db import connection

    from sessions import events

    result: dict = {"database": connection.vendor, "cpus": os.cpu_count()}
    result["load_average_1m_before"] = round(os.getloadavg()[0], 2)
    for group_commit in (True, False):
        settings.EVENTS_GROUP_COMMIT = group_commit
        key = "group_commit" if group_commit else "commit_per_emit"
        for emitters in (1, 20, 100):
            batches = events._group_commit().batches
            per = max(1, args.events // emitters) if emitters > 1 else min(args.events, 3000)
            entry = measure(make_sessions(emitters), per)
            if group_commit:
                statements = events._group_commit().batches - batches
                entry["events_per_statement"] = round(emitters * per / max(statements, 1), 1)
            result.setdefault(key, {})[f"{emitters}_emitters"] = entry
    settings.EVENTS_GROUP_COMMIT = True
    result["one_emitter_emit_many_100"] = measure(make_sessions(1), args.events, batch=100)
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Event ingest: events per second stored through emit(), each durable when its emit() returns.

"Ingest" here is N emitters in one process (threads: the runs on one worker's run pool), each calling
emit() for its own session as fast as it can, one event per call, every call returning only after
its row is committed (synchronous_commit on), measured over all N from start to the last return.
Reported for N = 1, 20 and 100, each with group commit on (the default: concurrent emits of a
process share one statement and commit) and off (one statement and commit per emit), plus one
emitter calling emit_many() with batches of 100 (how bulky output should be written). Prints JSON
with the machine's load average, since other work on a 2-core machine moves these numbers.

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


def measure(sessions: list[int], per_run: int, batch: int = 1) -> float:
    threads = [threading.Thread(target=emit_loop, args=(s, per_run, batch)) for s in sessions]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(len(sessions) * per_run / (time.perf_counter() - start), 1)


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
            rate = measure(make_sessions(emitters), per)
            entry = {"events_per_s": rate}
            if group_commit:
                statements = events._group_commit().batches - batches
                entry["events_per_statement"] = round(emitters * per / max(statements, 1), 1)
            result.setdefault(key, {})[f"{emitters}_emitters"] = entry
    settings.EVENTS_GROUP_COMMIT = True
    result["one_emitter_emit_many_100_events_per_s"] = measure(make_sessions(1), args.events, batch=100)
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

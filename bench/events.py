"""Events emitted per second through emit(): by one run, and by 20 concurrent runs (threads).

Each emit() is its own transaction (seq reservation + insert), as in a real run. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup  # noqa: E402

PER_RUN_SINGLE = 3000
CONCURRENT = 20
PER_RUN_CONCURRENT = 300


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
    setup()
    from django.db import connection

    single = make_sessions(1)
    many = make_sessions(CONCURRENT)
    result = {
        "database": connection.vendor,
        "one_run_events_per_s": measure(single, PER_RUN_SINGLE),
        "concurrent_runs": CONCURRENT,
        "concurrent_events_per_s": measure(many, PER_RUN_CONCURRENT),
        "one_run_batched_100_events_per_s": measure(make_sessions(1), PER_RUN_SINGLE * 3, batch=100),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

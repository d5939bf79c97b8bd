"""Outbound deliveries on Postgres: 1,000 callbacks through a real `deputies worker` to a receiver on
127.0.0.1 that answers 500 to 30% of first attempts (chosen per delivery id) and 200 otherwise.

Each delivery is enqueued in its own transaction, as a run's end does (``--rate`` per second; 0: as
fast as this process can). Measured from the delivery's creation (the run's end) to the receiver
getting its first attempt, and to the receiver accepting it (retries included); duplicates are the
requests beyond one per delivery (the retries); lost must be 0. Prints JSON.
Usage: .venv/bin/python bench/deliveries.py [--deliveries 1000 --rate 100 --fail 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# A database of its own, so it runs beside the other worker benches (which drop theirs).
os.environ.setdefault(
    "DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench_deliveries"
)
import procs  # noqa: E402  (picks this bench's own database)
from common import percentiles, setup  # noqa: E402

POLL_S = 0.2  # how often the receiver's log and the rows are read while waiting for the last answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument(
        "--rate", type=float, default=100.0, help="deliveries enqueued per second (0: no pacing)"
    )
    parser.add_argument("--enqueuers", type=int, default=1, help="threads ending runs at once")
    parser.add_argument("--fail", type=float, default=0.3, help="share of first attempts answered 500")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-deliveries-"))
    setup(data_dir)
    from django.db import connection, transaction

    from integrations.deliveries import services
    from integrations.deliveries.models import Delivery
    from sessions.models import Session

    team, user, repo = procs.bench_repository(data_dir)
    session = Session.objects.create(
        team=team, repository=repo, base_branch="main", model="x/y", status="completed"
    )

    env = procs.bench_env(
        data_dir,
        "http://127.0.0.1:9",  # no model is called
        DEPUTIES_CALLBACK_ALLOWED_NETWORKS="127.0.0.0/8",
        DEPUTIES_DELIVERY_BACKOFF_BASE="0.2",
        DEPUTIES_DELIVERY_BACKOFF_MAX="1",
    )
    # The receiver is its own process, so its threads do not share this one's CPU or GIL.
    log = data_dir / "received.jsonl"
    receiver = subprocess.Popen(
        [sys.executable, "-m", "tests.callback_receiver", "--fail", str(args.fail), "--log", str(log)],
        cwd=procs.ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    url = receiver.stdout.readline().strip()
    worker = procs.start([procs.DEPUTIES, "worker"], env, data_dir / "worker.log")
    try:
        subscription = services.subscribe(session, url, "bench-signing-secret", label="bench")

        def send(n: int) -> Delivery:
            with transaction.atomic():
                return services.enqueue(
                    session=session, kind="http", target=url, subscription=subscription,
                    event="bench", payload={"n": n, "status": "completed", "summary": "x" * 200},
                    idempotency_key=f"bench-{n}",
                )  # fmt: skip

        warm = [send(-n - 1).pk for n in range(5)]  # imports, pools and connections, not measured
        procs.wait_until(
            lambda: Delivery.objects.filter(pk__in=warm, status="delivered").count() == len(warm),
            60,
            "warm-up",
        )
        log.write_text("")

        def received() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

        load_before = procs.loadavg()
        created: dict[str, float] = {}
        committed: dict[str, float] = {}
        t0, wall0 = time.monotonic(), time.time()

        def enqueuer(numbers: range) -> None:
            try:
                for n in numbers:
                    if args.rate > 0:
                        delay = t0 + n / args.rate - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    d = send(n)
                    committed[str(d.pk)] = time.time()
                    created[str(d.pk)] = d.created.timestamp()
            finally:
                connection.close()

        threads = [
            threading.Thread(target=enqueuer, args=(range(i, args.deliveries, args.enqueuers),))
            for i in range(args.enqueuers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        enqueued = time.monotonic() - t0

        def accepted() -> set[str]:
            return {r["delivery"] for r in received() if r["answer"] == "200"}

        deadline = time.monotonic() + args.timeout
        procs.wait_until(
            lambda: set(created) <= accepted(),
            args.timeout,
            "every delivery accepted",
            POLL_S,
            required=False,
        )
        ids = [int(k) for k in created]
        procs.wait_until(  # the worker records the last answers
            lambda: not Delivery.objects.filter(pk__in=ids, status__in=("pending", "sending")).exists(),
            deadline - time.monotonic(),
            "the last answers recorded",
            POLL_S,
            required=False,
        )
        requests = [r for r in received() if r["delivery"] in created]
        first: dict[str, float] = {}
        after_commit: dict[str, float] = {}
        done: dict[str, float] = {}
        for r in sorted(requests, key=lambda r: r["at"]):
            key = r["delivery"]
            first.setdefault(key, r["at"] - created[key])
            after_commit.setdefault(key, r["at"] - committed[key])
            if r["answer"] == "200":
                done.setdefault(key, r["at"] - created[key])
        retried = [k for k in created if k in first and first[k] != done.get(k)]
        statuses = dict.fromkeys(("pending", "sending", "delivered", "failed"), 0)
        for status in Delivery.objects.filter(pk__in=ids).values_list("status", flat=True):
            statuses[status] += 1
        last_accept = max((r["at"] for r in requests if r["answer"] == "200"), default=wall0)
        result = {
            "deliveries": args.deliveries,
            "offered_rate_per_s": args.rate or None,
            "enqueuers": args.enqueuers,
            "enqueue_seconds": round(enqueued, 3),
            # From the first enqueue to the receiver accepting the last one.
            "deliveries_per_s": round(len(done) / max(1e-9, last_accept - wall0), 1),
            "first_attempt_ms": {k: round(v * 1000, 1) for k, v in percentiles(list(first.values())).items()},
            # The same, from the commit of the run's end (the worker's share of it).
            "first_attempt_from_commit_ms": {
                k: round(v * 1000, 1) for k, v in percentiles(list(after_commit.values())).items()
            },
            "first_attempt_ok_ms": {
                k: round(v * 1000, 1)
                for k, v in percentiles([done[k] for k in done if k not in retried] or [0.0]).items()
            },
            "delivered_ms": {
                k: round(v * 1000, 1) for k, v in percentiles(list(done.values()) or [0.0]).items()
            },
            "retried": len(retried),
            "requests": len(requests),
            "duplicates_seen_by_receiver": len(requests) - len(first),
            "lost": len(set(created) - set(done)),
            "statuses": statuses,
            "load_before": load_before,
            "load_after": procs.loadavg(),
        }
        print(json.dumps(result, indent=2))
    finally:
        connection.close()
        procs.stop(worker)
        procs.stop(receiver)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

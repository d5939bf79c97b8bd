"""Slash-command acknowledgement latency on Postgres: N signed ``/deputy`` requests to a live
``deputies web`` (daphne), each verified, deduplicated, authorized, turned into a queued session with
its first Slack delivery, and answered with the ephemeral "queued" message. Slack wants the answer
within 3 s; the target here is well under 50 ms. The Slack Web API is a loopback fake (only
``users.info`` is called, once: the mapping is cached). No worker: the runs stay queued.

Prints JSON. Usage: .venv/bin/python bench/slack_ack.py [--requests 200 --concurrency 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault(
    "DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench_slack"
)
import procs  # noqa: E402
from common import percentiles, setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-slack-"))
    setup(data_dir)
    import httpx

    from integrations.slack.models import SlackChannel, SlackWorkspace
    from sessions.models import Session
    from tests.slack_fake import (
        BOT_TOKEN,
        CHANNEL_ID,
        SIGNING_SECRET,
        TEAM_ID,
        FakeSlack,
        command_form,
        signed,
    )

    team, user, repo = procs.bench_repository(data_dir)
    user.email = "bench@example.com"
    user.save(update_fields=["email"])
    workspace, _ = SlackWorkspace.objects.get_or_create(slack_team_id=TEAM_ID, defaults={"team": team})
    SlackChannel.objects.get_or_create(
        workspace=workspace,
        channel_id=CHANNEL_ID,
        defaults={"team": team, "name": "#bench", "repository": repo},
    )
    with FakeSlack() as slack:
        slack.add_user("U0ALICE", "bench@example.com")
        env = procs.bench_env(
            data_dir, "http://127.0.0.1:9/v1", DEPUTIES_DEFAULT_MODEL="scripted/demo",
            DEPUTIES_SLACK_SIGNING_SECRET=SIGNING_SECRET, DEPUTIES_SLACK_BOT_TOKEN=BOT_TOKEN,
            DEPUTIES_SLACK_API_URL=slack.url,
        )  # fmt: skip
        port = procs.free_port()
        web = procs.start(
            [procs.DEPUTIES, "web", "--host", "127.0.0.1", "--port", str(port)], env, data_dir / "web.log"
        )
        base = f"http://127.0.0.1:{port}"
        try:

            def up() -> bool:
                try:
                    return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            procs.wait_until(up, 30, "deputies web")
            clients = [httpx.Client(timeout=30) for _ in range(args.concurrency)]

            def one(n: int) -> tuple[float, int, str]:
                body = urlencode(command_form(f"bench request {n}: fix the failing test")).encode()
                headers = {"Content-Type": "application/x-www-form-urlencoded", **signed(body)}
                started = time.perf_counter()
                answer = clients[n % len(clients)].post(
                    f"{base}/integrations/slack/commands", content=body, headers=headers
                )
                return time.perf_counter() - started, answer.status_code, answer.json().get("text", "")

            for n in range(args.warmup):
                one(-n - 1)
            # The same server's floor on this machine now: a request that touches no table.
            floor = []
            for _ in range(50):
                started = time.perf_counter()
                clients[0].get(f"{base}/healthz")
                floor.append(time.perf_counter() - started)
            before = Session.objects.count()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
            latencies = [r[0] for r in results]
            queued = sum(1 for r in results if r[1] == 200 and r[2].startswith(":inbox_tray: Queued"))
            print(json.dumps({
                "requests": args.requests,
                "concurrency": args.concurrency,
                "ack_ms": {k: round(v * 1000, 1) for k, v in percentiles(latencies).items()},
                "max_ms": round(max(latencies) * 1000, 1),
                "healthz_ms": {k: round(v * 1000, 1) for k, v in percentiles(floor).items()},
                "under_3s": sum(1 for x in latencies if x < 3.0),
                "queued_answers": queued,
                "sessions_created": Session.objects.count() - before,
                "acks_per_s": round(args.requests / wall, 1),
                "users_info_calls": len(slack.of("users.info")),
                "loadavg": procs.loadavg(),
            }, indent=2))  # fmt: skip
            for c in clients:
                c.close()
        finally:
            procs.stop(web)
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Dispatch latency on Postgres: POST /api/v1/sessions -> run started -> first model request.

Starts the real processes (daphne via `deputies web`, a qcluster via `deputies worker`) and the
scripted model in-process, then submits sessions one at a time and reports percentiles in ms.
The breakdown: ``post_to_session_row`` (HTTP, auth and validation until the session row is built),
``session_row_to_run_started`` (the create transaction, its commit, the queue hop, the claim; split
at the run row's ``created`` and ``started``, the claim's clock), and
``get_healthz`` (the HTTP round trip of a trivial request, for what the machine costs at the moment).
Usage: .venv/bin/python bench/dispatch.py [--sessions 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    bench_repository,
    free_port,
    percentiles,
    setup,
    wait_for_workers,
    wait_until,
)

# The waits for a session's first model request and its end poll this often: the latencies are
# measured at the moment a wait returns, so the interval is the figures' resolution.
POLL_S = 0.005
SCRIPT = {"responses": [{"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=50)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-"))
    setup(data_dir)
    import httpx
    from django.conf import settings
    from django.utils import timezone

    from sessions.agent.fake_llm import start_in_thread
    from sessions.models import APIToken, Event, Run, Session

    first_request: dict[str, float] = {}
    fake = start_in_thread(SCRIPT)

    def on_request(body: dict) -> None:
        prompt = next((m.get("content") for m in body.get("messages", []) if m.get("role") == "user"), "")
        first_request.setdefault(prompt, time.time())

    fake.on_request = on_request
    _, user, repo = bench_repository(data_dir, "bench-dispatch")
    _, secret = APIToken.issue(user, "bench")
    port = free_port()
    env = dict(os.environ)
    env.update(
        DATABASE_URL=os.environ["DATABASE_URL"],
        DEPUTIES_DATA_DIR=str(data_dir),
        DEPUTIES_SECRET_KEY=settings.SECRET_KEY,
        DEPUTIES_LLM_PROVIDERS="scripted",
        DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
        DEPUTIES_LOG_LEVEL="WARNING",
    )
    deputies = str(Path(sys.executable).parent / "deputies")
    launched = timezone.now()
    procs = [
        subprocess.Popen(
            [deputies, "web", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [deputies, "worker"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ),
    ]
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"}
        )
        wait_until(lambda: _ok(client), 30, "the web server", POLL_S)
        wait_for_workers(launched)  # the worker's start-up is not measured
        load_before = round(os.getloadavg()[0], 2)
        dispatch, first_llm, done, post, to_row, row_to_started, healthz = [], [], [], [], [], [], []
        parts: dict[str, list[float]] = defaultdict(list)
        for i in range(args.sessions + 3):
            prompt = f"bench dispatch {i} {time.time()}"
            t0 = time.time()
            r = client.post(
                "/api/v1/sessions", json={"repository": repo.pk, "prompt": prompt, "model": "scripted/demo"}
            )
            t_post = time.time()
            r.raise_for_status()
            sid = r.json()["id"]
            wait_until(lambda prompt=prompt: prompt in first_request, 30, "the first model request", POLL_S)
            status = wait_until(
                lambda sid=sid: (
                    (s := client.get(f"/api/v1/sessions/{sid}").json()["status"]) in ("completed", "failed")
                    and s
                ),
                30,
                "the session to finish",
                POLL_S,
            )
            t_done = time.time()
            started = Event.objects.get(session_id=sid, type="run_started").created.timestamp()
            row = Session.objects.get(pk=sid).created.timestamp()
            run = Run.objects.get(session_id=sid)
            queued, claimed = run.created.timestamp(), run.started.timestamp()
            h0 = time.time()
            client.get("/healthz").raise_for_status()
            healthz.append((time.time() - h0) * 1000)
            if i < 3:
                continue  # warm-up
            if status != "completed":
                raise SystemExit(f"session {sid} {status}")
            dispatch.append((started - t0) * 1000)
            to_row.append((row - t0) * 1000)
            row_to_started.append((started - row) * 1000)
            parts["session_row_to_run_row_ms"].append((queued - row) * 1000)
            parts["run_row_to_claim_ms"].append((claimed - queued) * 1000)
            parts["claim_to_run_started_event_ms"].append((started - claimed) * 1000)
            post.append((t_post - t0) * 1000)
            first_llm.append((first_request[prompt] - t0) * 1000)
            done.append((t_done - t0) * 1000)
        print(
            json.dumps(
                {
                    "database": "postgresql",
                    "sessions": args.sessions,
                    "post_response_ms": percentiles(post),
                    "post_to_run_started_ms": percentiles(dispatch),
                    "post_to_first_llm_request_ms": percentiles(first_llm),
                    "post_to_completed_seen_by_client_ms": percentiles(done),
                    "breakdown": {
                        "post_to_session_row_ms": percentiles(to_row),
                        "session_row_to_run_started_ms": percentiles(row_to_started),
                        **{name: percentiles(values) for name, values in parts.items()},
                        "get_healthz_ms": percentiles(healthz),
                    },
                    "cpus": os.cpu_count(),
                    "load_average_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
                },
                indent=2,
            )
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        fake.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _ok(client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except Exception:
        return False


if __name__ == "__main__":
    main()

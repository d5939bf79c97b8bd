"""What django-prometheus's request middleware costs per request (DEPUTIES_METRICS_MIDDLEWARE).

Two `deputies web` processes on the same Postgres, one with the middleware and one without; requests
alternate between them (so the machine's load hits both alike): GET /healthz, and POST
/api/v1/sessions (the dispatch path; no worker runs, the sessions just queue). Reports p50 and mean
in ms for each and the difference.
Usage: .venv/bin/python bench/middleware.py [--healthz 600] [--posts 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_repository, free_port, setup, wait_until  # noqa: E402
from dispatch import _ok  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--healthz", type=int, default=600)
    parser.add_argument("--posts", type=int, default=200)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-"))
    setup(data_dir)
    import httpx
    from django.conf import settings

    from sessions.models import APIToken

    _, user, repo = bench_repository(data_dir, "bench-middleware")
    _, secret = APIToken.issue(user, "bench")
    deputies = str(Path(sys.executable).parent / "deputies")
    servers, procs = {}, []
    for name, flag in (("without", "0"), ("with", "1")):
        port = free_port()
        env = dict(os.environ)
        env.update(
            DEPUTIES_SECRET_KEY=settings.SECRET_KEY,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL="http://127.0.0.1:9/v1",
            DEPUTIES_METRICS_MIDDLEWARE=flag,
        )
        procs.append(
            subprocess.Popen(
                [deputies, "web", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        servers[name] = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"}
        )
    try:
        for client in servers.values():
            wait_until(lambda client=client: _ok(client), 30, "the web servers")
        times: dict[str, dict[str, list[float]]] = {n: {"healthz": [], "post": []} for n in servers}
        body = {"repository": repo.pk, "prompt": "bench", "model": "scripted/demo"}
        for kind, count in (("healthz", args.healthz), ("post", args.posts)):
            for i in range(count + 20):
                for name in ("without", "with") if i % 2 else ("with", "without"):
                    client = servers[name]
                    t0 = time.perf_counter()
                    r = (
                        client.get("/healthz")
                        if kind == "healthz"
                        else client.post("/api/v1/sessions", json=body)
                    )
                    elapsed = (time.perf_counter() - t0) * 1000
                    r.raise_for_status()
                    if i >= 20:  # warm-up
                        times[name][kind].append(elapsed)
        result = {}
        for kind in ("healthz", "post"):
            p50 = {n: statistics.median(times[n][kind]) for n in servers}
            mean = {n: statistics.fmean(times[n][kind]) for n in servers}
            result[kind] = {
                "p50_ms": {n: round(v, 3) for n, v in p50.items()},
                "mean_ms": {n: round(v, 3) for n, v in mean.items()},
                "middleware_cost_p50_ms": round(p50["with"] - p50["without"], 3),
                "middleware_cost_mean_ms": round(mean["with"] - mean["without"], 3),
            }
        result["cpus"] = os.cpu_count()
        result["load_average_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result, indent=2))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

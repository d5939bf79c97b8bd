"""CPU of the web process per ``POST /api/v1/sessions``: `deputies web` alone, no worker.

Starts `deputies web` on the bench database, posts --warm sessions, then --posts more from --clients
threads, and reads the web process's user + system CPU from /proc around the measured ones (the
sessions stay queued: no worker runs them). --profile FILE runs the web process under cProfile with
each thread's CPU clock (the event loop's thread and every request thread), warm-up and shutdown
included, and writes the merged stats there at its exit. Prints JSON.
Usage: .venv/bin/python bench/web_post.py [--posts 300 --clients 8 --profile /tmp/web.prof]
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
os.environ.setdefault("DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench_web")
import procs  # noqa: E402  (picks this bench's own database)
from common import setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--warm", type=int, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--profile", help="write the web process's cProfile stats here")
    parser.add_argument(
        "--callgrind",
        help="run the web process under callgrind, counting instructions of the measured posts only; "
        "its output file goes here",
    )
    args = parser.parse_args()

    procs.exit_on_sigterm()
    procs.fresh_database()
    data_dir = Path(tempfile.mkdtemp(prefix="deputies-bench-webpost-"))
    setup(data_dir)
    import httpx

    from sessions.models import APIToken

    team, user, repo = procs.bench_repository(data_dir)
    _, secret = APIToken.issue(user, "bench")
    env = procs.bench_env(data_dir, "http://127.0.0.1:9/v1")
    port = procs.free_port()
    argv = [procs.DEPUTIES, "web", "--host", "127.0.0.1", "--port", str(port)]
    if args.profile:
        argv = [sys.executable, __file__, "--serve-profiled", str(Path(args.profile).resolve()), *argv[1:]]
    if args.callgrind:
        argv = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={args.callgrind}",
            sys.executable, *argv,
        ]  # fmt: skip
    web = procs.start(argv, env, data_dir / "web.log")
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"repository": repo.pk, "prompt": "p", "model": "scripted/x"}
    try:
        procs.wait_until(lambda: _ok(base), 600 if args.callgrind else 30, "the web server")
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            for _ in range(args.warm):
                http.post("/api/v1/sessions", json=body).raise_for_status()
        counter = iter(range(args.posts))
        latencies: list[float] = []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
                for _ in counter:
                    t = time.perf_counter()
                    http.post("/api/v1/sessions", json=body).raise_for_status()
                    with lock:
                        latencies.append((time.perf_counter() - t) * 1000)

        load_before = procs.loadavg()
        if args.callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(web.pid)], check=True, capture_output=True)
        cpu0, split0 = procs.cpu_seconds([web.pid]), _user_system(web.pid)
        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        instructions = None
        if args.callgrind:
            for action in ("--instr=off", "--dump"):
                subprocess.run(["callgrind_control", action, str(web.pid)], check=True, capture_output=True)
            instructions = _callgrind_total(args.callgrind) / args.posts
        cpu = procs.cpu_seconds([web.pid]) - cpu0
        user, system = (b - a for a, b in zip(split0, _user_system(web.pid), strict=True))
        print(
            json.dumps(
                {
                    "bench": "web_post",
                    "posts": args.posts,
                    "clients": args.clients,
                    "web_cpu_ms_per_post": round(cpu * 1000 / args.posts, 2),
                    "web_user_system_ms_per_post": [
                        round(user * 1000 / args.posts, 2),
                        round(system * 1000 / args.posts, 2),
                    ],
                    "posts_per_s": round(args.posts / wall, 1),
                    "latency_ms": _pct(latencies),
                    **({"instructions_per_post": round(instructions)} if instructions is not None else {}),
                    "loadavg_before": load_before,
                    "loadavg_after": procs.loadavg(),
                },
                indent=2,
            )
        )
    finally:
        procs.stop(web)
        shutil.rmtree(data_dir, ignore_errors=True)


def _callgrind_total(prefix: str) -> int:
    """Instructions in callgrind's dump files (``prefix.N``, one per ``--dump``)."""
    total = 0
    for path in Path(prefix).parent.glob(Path(prefix).name + ".*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


def _user_system(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _pct(samples: list[float]) -> dict[str, float]:
    from common import percentiles

    return percentiles(samples)


def _ok(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def serve_profiled(out: str, argv: list[str]) -> None:
    """`deputies <argv>` with a CPU-clock profiler in every thread; their stats merged at exit."""
    import atexit
    import cProfile
    import pstats
    import threading

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def profiled(run):
        def wrapper(self) -> None:
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            try:
                run(self)
            finally:
                prof.disable()
                with lock:
                    profiles.append(prof)

        return wrapper

    threading.Thread.run = profiled(threading.Thread.run)
    main_prof = cProfile.Profile(time.thread_time)

    def dump() -> None:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        with lock:
            for prof in profiles:
                stats.add(prof)
        stats.dump_stats(out)

    atexit.register(dump)
    from deputies.cli import main as deputies

    main_prof.enable()
    sys.exit(deputies(argv))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-profiled"]:
        serve_profiled(sys.argv[2], sys.argv[3:])
    else:
        main()

"""Shared by the worker benches: real processes, their memory from /proc, Postgres' own counters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEPUTIES = str(Path(sys.executable).parent / "deputies")
# These benches get a database of their own, so they can run beside the others.
os.environ.setdefault(
    "DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench_workers"
)
# After the line above: common reads the bench database's URL when it is imported.
from common import bench_repository, free_port, wait_for_workers, wait_until  # noqa: E402, F401  (for the benches)

# Postgres backends report their transaction counts about once a second: wait this long after a
# measured window before reading pg_stat_database, so the window's last transactions are counted.
STATS_FLUSH_S = 1.5


def fresh_database() -> None:
    """Drop and re-create the bench database: no leftover tasks or runs from an earlier bench."""
    name = database_name()
    with stats_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def exit_on_sigterm() -> None:
    """`timeout` and Ctrl-C end the bench through its finally blocks, so no process is left behind."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def caller(depth: int = 3) -> str:
    """The innermost ``depth`` frames of the project's own code that led here (a statement, say)."""
    import traceback

    root = str(ROOT)
    frames = [
        f"{Path(f.filename).relative_to(root)}:{f.name}"
        for f in traceback.extract_stack()
        if f.filename.startswith(root) and "/bench/" not in f.filename and "/.venv/" not in f.filename
    ]
    return " < ".join(reversed(frames[-depth:]))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL to the group of a process ``start`` made: as the end-to-end tests stop theirs."""
    from tests.live import stop_process

    stop_process(proc, timeout)


# --- memory ------------------------------------------------------------------------------------


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _kb(path: str, field: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pids: list[int]) -> int:
    return sum(_kb(f"/proc/{pid}/status", "VmRSS:") for pid in pids)


def pss_kb(pids: list[int]) -> int:
    """Proportional set size: shared pages split between the processes that share them."""
    return sum(_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes, with that of the children they waited for (git)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


def pg_backend_cpu(conn, name: str) -> dict[int, float]:
    """CPU seconds so far of each Postgres backend connected to the database ``name``."""
    pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", [name])]
    return {pid: cpu_seconds([pid]) for pid in pids}


# --- Postgres ----------------------------------------------------------------------------------


def database_name() -> str:
    return urlsplit(os.environ["DEPUTIES_BENCH_DATABASE_URL"]).path.lstrip("/")


def stats_connection():
    """A connection to the maintenance database: watching must not count as the bench db's work."""
    import psycopg

    url = urlsplit(os.environ["DEPUTIES_BENCH_DATABASE_URL"])
    return psycopg.connect(urlunsplit(url._replace(path="/postgres")), autocommit=True)


def pg_connections(conn, name: str, app: str | None = None) -> int:
    if app is None:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [name]).fetchone()[0]
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s", [name, app]
    ).fetchone()[0]


def pg_transactions(conn, name: str) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [name]
    ).fetchone()
    return int(row[0])


class Sampler(threading.Thread):
    """Peaks, every ``interval``: summed RSS/PSS of some process trees (with their short-lived
    commands: a command forked and not yet exec'd counts its parent's pages again), RSS of each
    root's child process itself (a supervisor's workers), the process count, and Postgres
    connections: all of the
    bench database's and those whose ``application_name`` is ``app`` (the processes under test set
    it with ``PGAPPNAME``, so the bench's own connection is not counted)."""

    def __init__(self, roots: list[int], interval: float = 0.25, app: str | None = None) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.interval = interval
        self.app = app
        self.peak_rss = self.peak_pss = self.peak_connections = self.peak_processes = 0
        self.peak_app_connections = 0
        self.peak_child_rss: dict[int, int] = {}
        self.halt = threading.Event()
        self.conn = stats_connection()
        self.name_ = database_name()

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def sample(self) -> None:
        pids = [p for root in self.roots for p in tree(root)]
        self.peak_rss = max(self.peak_rss, rss_kb(pids))
        self.peak_pss = max(self.peak_pss, pss_kb(pids))
        self.peak_processes = max(self.peak_processes, len(pids))
        for child in children(self.roots):
            self.peak_child_rss[child] = max(self.peak_child_rss.get(child, 0), rss_kb([child]))
        self.peak_connections = max(self.peak_connections, pg_connections(self.conn, self.name_))
        if self.app is not None:
            self.peak_app_connections = max(
                self.peak_app_connections, pg_connections(self.conn, self.name_, self.app)
            )

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        self.conn.close()
        peaks = {
            "peak_worker_rss_mb": round(self.peak_rss / 1024, 1),
            "peak_worker_pss_mb": round(self.peak_pss / 1024, 1),
            "peak_rss_mb_per_worker": [round(kb / 1024, 1) for kb in self.peak_child_rss.values()],
            "peak_worker_processes": self.peak_processes,
            "peak_pg_connections": self.peak_connections,
        }
        if self.app is not None:
            peaks["peak_pg_connections_of_workers"] = self.peak_app_connections
        return peaks


def children(roots: list[int]) -> list[int]:
    """The direct children of ``roots`` (the processes a supervisor started)."""
    found = []
    for root in roots:
        try:
            with open(f"/proc/{root}/task/{root}/children") as fh:
                found.extend(int(pid) for pid in fh.read().split())
        except OSError:
            continue
    return found


def pg_backend_pids(conn, name: str, app: str) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s", [name, app]
    ).fetchall()
    return [row[0] for row in rows]


# --- the deployment under test -----------------------------------------------------------------


def bench_env(data_dir: Path, fake_url: str, **extra: str) -> dict[str, str]:
    from django.conf import settings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPUTIES_", "DJANGO_"))}
    env.update(
        DATABASE_URL=os.environ["DATABASE_URL"],
        DEPUTIES_DATA_DIR=str(data_dir),
        DEPUTIES_SECRET_KEY=settings.SECRET_KEY,
        DEPUTIES_LLM_PROVIDERS="scripted",
        DEPUTIES_LLM_SCRIPTED_BASE_URL=fake_url,
        DEPUTIES_LOG_LEVEL="WARNING",
        DEPUTIES_ALLOW_LOCAL_REPOSITORIES="true",  # the bench repository is in the data directory
        DEPUTIES_LOCAL_REPOSITORY_ROOTS=str(data_dir.resolve()),
        # Benches measure the server, not its rate limits (one client sends thousands a minute).
        DEPUTIES_API_RATE="0",
        DEPUTIES_API_RATE_SESSIONS="0",
    )
    if getattr(settings, "SECRETS_KEYS", None):
        env["DEPUTIES_SECRETS_KEY"] = ",".join(settings.SECRETS_KEYS)
    env.update(extra)
    return env


def start_fake_llm(script: dict, data_dir: Path) -> tuple[subprocess.Popen, str]:
    """`deputies fake-llm` as its own process, so its threads do not share the bench's CPU or GIL."""
    path = data_dir / "script.json"
    path.write_text(json.dumps(script))
    port = free_port()
    proc = start(
        [DEPUTIES, "fake-llm", "--script", str(path), "--port", str(port)],
        dict(os.environ),
        data_dir / "fake.log",
    )
    url = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 20, "the scripted model")
    return proc, url

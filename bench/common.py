"""Shared set-up for benchmarks: a dedicated Postgres database, migrated, with a team and a repo."""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = os.environ.get("DEPUTIES_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/deputies_bench")


def setup(data_dir: Path | None = None) -> None:
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    url = urlsplit(BENCH_DB)
    name = url.path.lstrip("/")
    with psycopg.connect(urlunsplit(url._replace(path="/postgres")), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = BENCH_DB
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deputies.settings")
    if data_dir is not None:
        os.environ["DEPUTIES_DATA_DIR"] = str(data_dir)
        # The benches' repositories are made in the data directory; Postgres turns local ones off.
        os.environ.setdefault("DEPUTIES_ALLOW_LOCAL_REPOSITORIES", "true")
        os.environ.setdefault("DEPUTIES_LOCAL_REPOSITORY_ROOTS", str(Path(data_dir).resolve()))
    os.environ.setdefault("DEPUTIES_LOG_LEVEL", "WARNING")
    # Benchmarks measure the server, not its rate limits (one client sends thousands a minute).
    os.environ.setdefault("DEPUTIES_API_RATE", "0")
    os.environ.setdefault("DEPUTIES_API_RATE_SESSIONS", "0")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05, *, required: bool = True):
    """Poll ``predicate`` until it returns something truthy (returned). After ``timeout`` exit, or
    when not ``required`` return None: the bench then reports what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    if required:
        raise SystemExit(f"timed out waiting for {what}")
    return None


def wait_for_workers(started_after: datetime, count: int = 1, timeout: float = 60) -> None:
    """Until ``count`` ``deputies worker`` processes started after ``started_after`` wrote their first
    heartbeat: each has imported Django, made its run pool and entered its loop."""
    from sessions.models import WorkerProcess

    wait_until(
        lambda: WorkerProcess.objects.filter(started__gte=started_after).count() >= count,
        timeout,
        f"{count} worker(s) to start",
    )


def bench_repository(data_dir: Path, name: str = "bench-workers"):
    """The bench team, its owner and a small real git repository (after ``setup``)."""
    from django.contrib.auth import get_user_model

    from sessions.models import Membership, Repository, Team
    from tests.conftest import make_git_repo

    user, _ = get_user_model().objects.get_or_create(username="bench")
    team, _ = Team.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    Membership.objects.get_or_create(team=team, user=user, defaults={"role": "owner"})
    repo_path = make_git_repo(data_dir / "repo")
    repo, _ = Repository.objects.update_or_create(
        team=team, name=name, defaults={"url": str(repo_path), "provider": "local"}
    )
    return team, user, repo


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))], 3)

    return {
        "p50": pick(0.5),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "mean": round(statistics.fmean(ordered), 3),
    }

"""Helpers for end-to-end tests that run real processes against the test database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def database_url_for_children() -> str:
    """The URL of the database this test runs on, so child processes share it."""
    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def child_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPUTIES_", "PYTEST_", "DJANGO_"))}
    env.update(
        {
            # Same key as the test process: django-q2 signs task payloads with it.
            "DEPUTIES_SECRET_KEY": settings.SECRET_KEY,
            # And the same keys for environment secrets, which children decrypt.
            "DEPUTIES_SECRETS_KEY": ",".join(settings.SECRETS_KEYS),
            "DATABASE_URL": database_url_for_children(),
            "DEPUTIES_DATA_DIR": str(data_dir),
            "DEPUTIES_QUEUE_POLL": "0.05",
            "DEPUTIES_LOG_LEVEL": "WARNING",
            "DEPUTIES_RESOLVE_NAMES": "false",  # no DNS queries: they would leave loopback
            "DJANGO_SETTINGS_MODULE": "deputies.settings",
            # The repository rules this test runs under (tests/conftest.py), for the worker's re-check.
            "DEPUTIES_ALLOW_LOCAL_REPOSITORIES": "true" if settings.ALLOW_LOCAL_REPOSITORIES else "false",
            "DEPUTIES_LOCAL_REPOSITORY_ROOTS": ",".join(str(p) for p in settings.LOCAL_REPOSITORY_ROOTS),
            "DEPUTIES_REPOSITORY_ALLOWED_NETWORKS": ",".join(
                str(n) for n in settings.REPOSITORY_ALLOWED_NETWORKS
            ),
        }
    )
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the main process (started with ``start_new_session``), then SIGKILL to its group.

    The main process stops its own children: a qcluster whose whole group is signalled at once can
    hang on shutdown.
    """
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def worker_process(
    env: dict[str, str], kind: str = "deputies", name: str = "worker"
) -> Iterator[subprocess.Popen]:
    """A real ``deputies worker`` (what Scale mode runs), or with ``kind="qcluster"`` django-q2's own
    cluster running the same tasks; output in ``DATA_DIR/<name>.log``; SIGTERM (then SIGKILL) when
    the block ends."""
    log = open(Path(env["DEPUTIES_DATA_DIR"]) / f"{name}.log", "wb")  # noqa: SIM115
    argv = {
        "deputies": [str(Path(sys.executable).parent / "deputies"), "worker"],
        "qcluster": [sys.executable, str(ROOT / "manage.py"), "qcluster"],
    }[kind]
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc)
        log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def web_process(env: dict[str, str], port: int | None = None, name: str = "web") -> Iterator[str]:
    """A real ``deputies web`` (daphne) on loopback; yields its base URL once ``/healthz`` answers.
    Output in ``DATA_DIR/<name>.log``; SIGTERM (then SIGKILL) when the block ends."""
    import httpx

    port = port or free_port()
    log_path = Path(env["DEPUTIES_DATA_DIR"]) / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "deputies"), "web", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout=30, what="daphne to answer")
        yield base
    finally:
        stop_process(proc)
        log.close()

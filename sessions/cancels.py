"""Cancel in flight: a cancelled run's running command is killed within a second, not at its next step.

``Session.cancel`` only marks the run cancelled in the database; the worker running it has to find
out. Between steps the agent loop's heartbeat does (``Run.beat``). While a command runs, one thread
per worker process (``CancelWatch``) asks, every ``DEPUTIES_CANCEL_POLL`` seconds, which of the runs
with a command in flight *in this process* are no longer running -- one query for all of them -- and
sets their ``Cancel``; the sandbox provider then kills the command's process group or container exec
(sandboxes/base.py ``Cancel``). "No longer running" is a cancel, or a run that lease recovery took
away from this worker: either way this worker must stop touching the sandbox.

Why a poll rather than LISTEN on a cancel notification: the poll only happens while a command runs
(an idle worker sends nothing), costs one indexed query per interval per worker process whatever
the number of runs, needs no extra connection per process, and works on SQLite too; LISTEN would
answer a few hundred milliseconds sooner for a dedicated connection per process and a second code
path. Measured figures are in the README (``DEPUTIES_CANCEL_POLL``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings

from sandboxes.base import Cancel, ExecResult, OutputCallback

log = logging.getLogger(__name__)


class CancelWatch:
    """The per-process watcher: run id -> the ``Cancel`` of each command in flight for that run."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.watched: dict[int, list[Cancel]] = {}
        self.thread: threading.Thread | None = None

    @contextmanager
    def watching(self, run_id: int, cancel: Cancel) -> Iterator[None]:
        with self.cond:
            self.watched.setdefault(run_id, []).append(cancel)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="cancel-watch", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                cancels = self.watched[run_id]
                cancels.remove(cancel)
                if not cancels:
                    del self.watched[run_id]

    def _loop(self) -> None:
        while True:
            with self.cond:
                if not self.watched:
                    _close_connection()  # idle: hold nothing, ask nothing
                while not self.watched:
                    self.cond.wait()
            time.sleep(settings.CANCEL_POLL)
            try:
                self.check()
            except Exception:  # this thread must outlive any one bad check
                log.exception("the cancel watcher's check failed")

    def check(self) -> None:
        """One query: set the ``Cancel`` of every watched run that is not running any more."""
        from sessions.models import Run

        with self.cond:
            ids = list(self.watched)
        if not ids:
            return
        try:
            stopped = list(
                Run.objects.filter(pk__in=ids)
                .exclude(status=Run.Status.RUNNING)
                .order_by()
                .values_list("pk", flat=True)
            )
        except Exception as exc:  # the database is away: try again next interval
            log.warning("cannot check for cancelled runs: %s", exc)
            _close_connection()
            return
        # The connection stays with this thread while commands run (taking it from the pool again
        # each time would cost a check and a session set-up per poll); it is closed when idle.
        with self.cond:
            cancels = [c for pk in stopped for c in self.watched.get(pk, [])]
        for cancel in cancels:
            cancel.set()


def _close_connection() -> None:
    from django.db import connection

    try:
        connection.close()
    except Exception:  # a broken connection is as good as closed
        log.debug("closing the cancel watcher's connection failed", exc_info=True)


_watch: CancelWatch | None = None
_watch_pid: int | None = None
_watch_lock = threading.Lock()


def get_watch() -> CancelWatch:
    """This process's watcher (made after a fork, so each worker process has its own thread)."""
    global _watch, _watch_pid
    with _watch_lock:
        if _watch is None or _watch_pid != os.getpid():
            _watch, _watch_pid = CancelWatch(), os.getpid()
        return _watch


class CancellingHandle:
    """A run's sandbox handle: its commands are watched for the run's cancellation while they run.

    The run has one ``Cancel``: once set, the command in flight is killed and later ones do not
    start, so nothing else runs in the sandbox for a cancelled run (files can still be read, and
    the runner still collects the diff).
    """

    def __init__(self, inner: Any, run_id: int) -> None:
        self._inner = inner
        self.run_id = run_id
        self.cancel = Cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def exec(
        self,
        argv: list[str],
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        cancel: Cancel | None = None,
    ) -> ExecResult:
        with get_watch().watching(self.run_id, self.cancel):
            if cancel is None:
                return self._inner.exec(
                    argv, cwd=cwd, env=env, timeout=timeout, on_output=on_output, cancel=self.cancel
                )
            with self.cancel.on_set(cancel.set):  # the caller's own switch, set by the run's too
                return self._inner.exec(
                    argv, cwd=cwd, env=env, timeout=timeout, on_output=on_output, cancel=cancel
                )

"""Many runs per worker process: django-q2 hands a run to a bounded pool of threads in this process.

A run spends nearly all of its time waiting: on the model over HTTP, on a sandbox command. One
django-q2 worker process per run costs ~60 MB and a database connection each, so the queue task
(``sessions.tasks.execute_run``) only starts the run on a thread here and returns. The pool's size
(``DEPUTIES_RUNS_PER_WORKER``) caps the runs of one process; when it is full the task *blocks*, so
the queue applies back-pressure and the other worker processes (or hosts) take the rest.

What does not change:

* Claiming is still the conditional update in ``Run.claim``: a duplicate delivery is a no-op.
* Crash safety is the lease: one thread per process (``Heartbeat``) beats for all the process's runs
  in one statement every third of ``DEPUTIES_RUN_LEASE``, however long their steps take; a run whose
  process dies stops heartbeating, and ``Run.recover_stale`` (every few seconds on each worker's loop)
  queues it again, to resume from its checkpoint. The queue task is acknowledged in the run's
  claim (sessions/runner.py, ``claim``), not when it ends.
* Threads hold a database connection only while they talk to the database. On Postgres the
  connections come from Django's psycopg pool (``DEPUTIES_DB_POOL_SIZE`` per process) and a run gives
  its connection back before every model call and every sandbox command (``releasing_llm``,
  ``releasing_handle``), so 200 runs need a handful of connections, not 200.

Shutdown (SIGTERM to the qcluster): the worker process stops taking tasks, then waits up to
``DEPUTIES_WORKER_GRACE`` seconds for its runs to finish. Runs still going after that are left to
lease recovery with their heartbeat backdated (and the process's heartbeat stopped), so the next
recovery pass picks them up once this process is gone; none is lost and none runs twice at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)


def pooled() -> bool:
    """Whether this process's default database uses Django's connection pool."""
    from django.db import connection

    return bool(connection.settings_dict.get("OPTIONS", {}).get("pool"))


def release_connection() -> None:
    """Give this thread's connection back to the pool; it is taken again on the next query.

    Only with a pool (a plain connection would be re-opened, which costs far more than it saves) and
    never inside a transaction.
    """
    from django.db import connection

    if connection.connection is not None and not connection.in_atomic_block and pooled():
        connection.close()


def forget_inherited_pools() -> None:
    """After fork: the parent's pool (its threads did not survive, its sockets are the parent's) must
    never be used here; the child builds its own on first use. Registered with ``os.register_at_fork``."""
    import sys

    base = sys.modules.get("django.db.backends.postgresql.base")
    if base is not None:
        base.DatabaseWrapper._connection_pools = {}
    connections = sys.modules.get("django.db")
    if connections is not None:
        for conn in connections.connections.all(initialized_only=True):
            conn.connection = None  # the parent's socket: drop it without closing it


class _ReleasingLLM:
    """An LLM client that gives the DB connection back before each model call and after each attempt
    is recorded (so a retry's back-off sleeps without one)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def complete(self, messages, tools=None, *, on_attempt=None):
        def recorded(record) -> None:
            if on_attempt is not None:
                on_attempt(record)
            release_connection()

        release_connection()
        return self._inner.complete(messages, tools, on_attempt=recorded)


class _ReleasingHandle:
    """A sandbox handle that gives the DB connection back before each command (tests may run long)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def exec(self, *args, **kwargs):
        release_connection()
        return self._inner.exec(*args, **kwargs)


def releasing_llm(client: Any) -> Any:
    return _ReleasingLLM(client) if pooled() else client


def releasing_handle(handle: Any) -> Any:
    return _ReleasingHandle(handle) if pooled() else handle


class Heartbeat:
    """Keeps the leases of this process's runs: one UPDATE for all of them, every third of the lease.

    The agent loop's own beat (one per step) also saves the checkpoint and notices cancels, but a
    step can take as long as a command's timeout; with this the lease only has to outlast a few
    missed beats, not the longest step, so a lost worker is noticed within a lease of its death.
    A wedged run thread keeps its lease; its own timeouts (exec, model call, DEPUTIES_RUN_TIMEOUT at
    the next step) end it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[int, int] = {}  # run id -> holders (a duplicate delivery makes 2)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def interval(self) -> float:
        from django.conf import settings

        return max(0.5, settings.RUN_LEASE_SECONDS / 3)

    @contextmanager
    def beating(self, run_id: int) -> Iterator[None]:
        with self.lock:
            self.runs[run_id] = self.runs.get(run_id, 0) + 1
            if self.thread is None and not self.stopped.is_set():
                self.thread = threading.Thread(target=self.loop, name="heartbeat", daemon=True)
                self.thread.start()
        try:
            yield
        finally:
            with self.lock:
                left = self.runs.get(run_id, 0) - 1
                if left > 0:
                    self.runs[run_id] = left
                else:
                    self.runs.pop(run_id, None)

    def loop(self) -> None:
        while not self.stopped.wait(self.interval()):
            with self.lock:
                ids = sorted(self.runs)
            if ids:
                self.beat(ids)

    def beat(self, run_ids: list[int]) -> int:
        from django.db import connection
        from django.utils import timezone

        from sessions.models import Run
        from sessions.runner import worker_id

        try:
            return Run.objects.filter(
                pk__in=run_ids, status=Run.Status.RUNNING, lease_owner=worker_id()
            ).update(heartbeat=timezone.now())
        except Exception as exc:  # the database is away: the runs' own steps say so; try again next time
            log.warning("heartbeat for runs %s failed (%s: %s)", run_ids, type(exc).__name__, exc)
            return 0
        finally:
            try:
                connection.close()
            except Exception:
                log.exception("closing the heartbeat's connection")

    def stop(self) -> None:
        """No more beats from this process (it is handing its runs over)."""
        self.stopped.set()
        with self.lock:
            thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


_heartbeat: Heartbeat | None = None
_heartbeat_pid: int | None = None


def heartbeat() -> Heartbeat:
    """This process's heartbeat (made after a fork, like the pool)."""
    global _heartbeat, _heartbeat_pid
    with _pool_lock:
        if _heartbeat is None or _heartbeat_pid != os.getpid():
            _heartbeat, _heartbeat_pid = Heartbeat(), os.getpid()
        return _heartbeat


class RunPool:
    """A fixed number of slots; each started run holds one on its own daemon thread.

    ``reserve`` a slot first (that is where callers wait, or give up), claim the run, then ``start``
    it on the reserved slot, or ``unreserve`` when there is nothing to start.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots = threading.BoundedSemaphore(size)
        self.lock = threading.Lock()
        self.running: dict[int, int] = {}  # run id -> threads on it (a duplicate delivery makes 2)
        self.idle = threading.Condition(self.lock)

    def reserve(self, wait: float | None) -> bool:
        return self.slots.acquire(timeout=wait)

    def unreserve(self) -> None:
        self.slots.release()

    def start(self, run_id: int, work: Callable[[], str]) -> None:
        """Run ``work()`` on a new thread, on a slot the caller reserved."""
        with self.lock:
            self.running[run_id] = self.running.get(run_id, 0) + 1
        thread = threading.Thread(target=self._run, args=(run_id, work), name=f"run-{run_id}", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._done(run_id)
            raise

    def _run(self, run_id: int, work: Callable[[], str]) -> None:
        from django.db import connection

        try:
            log.info("run %s: %s", run_id, work())
        except Exception:
            log.exception("run %s crashed", run_id)
        finally:
            try:
                connection.close()  # back to the pool (or closed); this thread is about to end
            except Exception:
                log.exception("closing the connection of run %s", run_id)
            self._done(run_id)

    def _done(self, run_id: int) -> None:
        with self.lock:
            left = self.running.get(run_id, 0) - 1
            if left > 0:
                self.running[run_id] = left
            else:
                self.running.pop(run_id, None)
            self.idle.notify_all()
        self.slots.release()

    def in_flight(self) -> list[int]:
        with self.lock:
            return sorted(self.running)

    def drain(self, grace: float) -> list[int]:
        """Wait up to ``grace`` seconds for the runs to end; returns those still running."""
        deadline = time.monotonic() + grace
        with self.lock:
            while self.running:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.idle.wait(left)
            return sorted(self.running)


_pool: RunPool | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def get_pool() -> RunPool:
    """This process's pool, made on first use (after the fork, so each worker process has its own)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            from django.conf import settings

            _pool, _pool_pid = RunPool(settings.RUNS_PER_WORKER), os.getpid()
            _at_exit(_pool)
        return _pool


def _at_exit(pool: RunPool) -> None:
    """Drain the pool when the worker process exits (django-q2 sends it STOP on SIGTERM).

    A multiprocessing finalizer runs in the child before the process ends; plain ``atexit`` would not.
    """
    from multiprocessing import util

    util.Finalize(pool, shutdown, args=(pool,), exitpriority=100)


def shutdown(pool: RunPool) -> None:
    from django.conf import settings

    if not pool.in_flight():
        return
    log.warning("worker stopping: waiting up to %ss for %d runs", settings.WORKER_GRACE, len(pool.running))
    left = pool.drain(settings.WORKER_GRACE)
    if left:
        hand_over(left)


def hand_over(run_ids: list[int]) -> None:
    """Leave runs this process cannot finish to lease recovery, as soon as the process is gone.

    Their heartbeat is moved past the lease, so the next ``recover_stale_runs`` pass (a few seconds
    on any worker) requeues them. The process exits right after this; its heartbeat stops first.
    """
    from django.conf import settings
    from django.utils import timezone

    from sessions.models import Run
    from sessions.runner import worker_id

    heartbeat().stop()
    stale = timezone.now() - timedelta(seconds=settings.RUN_LEASE_SECONDS + 1)
    try:
        count = Run.objects.filter(pk__in=run_ids, status=Run.Status.RUNNING, lease_owner=worker_id()).update(
            heartbeat=stale
        )
    except Exception:
        log.exception("could not hand over runs %s; they wait out their lease", run_ids)
        return
    log.warning("worker stopping: left %d unfinished runs to lease recovery: %s", count, run_ids)

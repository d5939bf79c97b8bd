"""``deputies worker``: one process that takes django-q2 tasks and runs many runs at once on threads.

django-q2 stays the queue: its broker (``deputies.broker.NotifyingORM``, LISTEN/NOTIFY wakeups), its
signed task format, its schedules (``Schedule`` rows, run by ``django_q.scheduler``) and its result
rows for the admin. What this replaces is ``qcluster``'s process tree (a sentinel, a pusher, a monitor
and N workers, each a forked Django of 60-80 MB), because runs now live on threads
(sessions/workpool.py) and that tree stops fitting:

* memory: an idle qcluster with two workers is ~400 MB; this is one process of ~80 MB;
* robustness: a qcluster worker waiting for work holds the lock of the shared multiprocessing queue,
  and one killed there (the OOM killer, ``kill -9``) wedges the whole cluster. With runs on threads a
  worker waits there nearly all the time. Here a killed worker is simply a dead process: its
  supervisor starts another and lease recovery requeues its runs;
* semantics: qcluster's per-task timeout and recycling kill the process, i.e. every run on it.

The loop: reserve a run slot (while the pool is full it takes nothing, so other workers get the
work), dequeue a task per free slot (a few at most), and either start each on the pool, where the
run's own thread claims it and acknowledges the task in the claim's statement (from then on the
run's lease protects it), or hand any other task (schedules: stale run recovery, the sandbox
reaper) to a small side executor that saves its result as qcluster does. Every 30 s it runs the
django-q2 scheduler, like qcluster's sentinel, and every few seconds (``recovery_interval``) it
looks for runs whose worker was lost (``Run.recover_stale``: one indexed query when there are
none), so a killed worker's runs resume within about one ``DEPUTIES_RUN_LEASE`` instead of waiting
for the every-minute schedule. A task taken and not acknowledged yet is held (``hold``); one whose
worker was lost comes back after the queue's ``retry``, two leases.

``manage.py qcluster`` still works (``sessions.tasks.execute_run`` uses the same pool inside each
qcluster worker), but ``deputies worker`` is the supported way to run workers.
"""

from __future__ import annotations

import logging
import os
import pydoc
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from deputies.stopping import set_on_signals

log = logging.getLogger("deputies.worker")

RUN_TASK = "sessions.tasks.execute_run"
# Outbound deliveries get their own threads: a slow receiver must not hold up the schedules.
DELIVERY_TASK = "integrations.deliveries.tasks.send_delivery"
SCHEDULER_INTERVAL = 30.0  # seconds, as qcluster's sentinel
TAKE_AT_ONCE = 8  # tasks one dequeue may take, each on a free run slot


def recovery_interval() -> float:
    """How often each worker checks for lost runs: a third of the lease, at most 5 s (an idle
    worker then costs the database one small query per 5 s)."""
    from django.conf import settings

    return max(0.5, min(5.0, settings.RUN_LEASE_SECONDS / 3))


class Worker:
    def __init__(self) -> None:
        from django_q.brokers import get_broker

        from sessions.workpool import get_pool

        self.broker = get_broker()
        self.pool = get_pool()
        self.stopping = threading.Event()
        self.taken: set = set()  # tasks being worked on, not acknowledged yet (see hold)
        self.taken_lock = threading.Lock()
        self.side = ThreadPoolExecutor(max_workers=2, thread_name_prefix="task")
        from django.conf import settings

        self.deliveries = ThreadPoolExecutor(
            max_workers=settings.DELIVERY_CONCURRENCY, thread_name_prefix="delivery"
        )

    def serve(self) -> int:
        from django.conf import settings
        from django_q.conf import Conf
        from django_q.scheduler import scheduler

        set_on_signals(self.stopping)
        log.info("worker %s: up to %d runs at once", os.getpid(), self.pool.size)
        from django.db import connection

        from sessions.workpool import pooled

        if connection.vendor == "postgresql" and not pooled():
            log.warning(
                "no database connection pool (psycopg[pool] missing or DEPUTIES_DB_POOL_SIZE=0): "
                "every running run keeps its own Postgres connection"
            )
        from integrations.slack.socket_mode import start_in_worker

        slack = start_in_worker()  # Socket Mode beside the runs, when DEPUTIES_SLACK_APP_TOKEN is set
        next_schedule = next_recovery = next_beat = next_hold = 0.0
        while not self.stopping.is_set():
            if time.monotonic() >= next_beat:
                from sessions.models import WorkerProcess

                next_beat = time.monotonic() + WorkerProcess.BEAT_SECONDS
                self.beat()
            if settings.Q_CLUSTER.get("scheduler", True) and time.monotonic() >= next_schedule:
                next_schedule = time.monotonic() + SCHEDULER_INTERVAL
                scheduler(broker=self.broker)  # logs its own errors
            if time.monotonic() >= next_recovery:
                next_recovery = time.monotonic() + recovery_interval()
                self.recover()
            if time.monotonic() >= next_hold:
                next_hold = time.monotonic() + Conf.RETRY / 3
                self.hold()
            if not self.pool.reserve(wait=1.0):
                continue  # full: leave the queue to other workers
            slots = 1  # and the free slots, up to TAKE_AT_ONCE: a backlog costs fewer statements
            while slots < TAKE_AT_ONCE and self.pool.reserve(wait=0):
                slots += 1
            try:
                tasks = self.broker.dequeue(slots) or []  # waits up to the poll interval when empty
            except Exception:
                log.exception("could not read the queue; retrying")
                tasks = []
                self.stopping.wait(5)
            for _ in range(slots - len(tasks)):
                self.pool.unreserve()
            for ack_id, payload in tasks:
                self.handle(ack_id, payload)
        if slack is not None:
            slack.close()
        return self.shutdown()

    def beat(self, gone: bool = False) -> None:
        """This process's liveness row, for /setup (deleted when it stops cleanly)."""
        import socket

        from django.utils import timezone

        from sessions.models import WorkerProcess
        from sessions.workpool import release_connection

        name = f"{socket.gethostname()}:{os.getpid()}"
        try:
            if gone:
                WorkerProcess.objects.filter(name=name).delete()
            else:
                self.started = getattr(self, "started", None) or timezone.now()
                WorkerProcess.beat(
                    name,
                    socket.gethostname(),
                    os.getpid(),
                    self.started,
                    len(self.pool.in_flight()),
                    self.pool.size,
                )
        except Exception as exc:  # the database is away: the next beat retries
            log.warning("worker heartbeat failed (%s: %s)", type(exc).__name__, exc)
        finally:
            release_connection()

    def recover(self) -> None:
        """Queue again the runs of workers that stopped heartbeating (they resume from their checkpoint)."""
        from sessions.tasks import recover_stale_runs
        from sessions.workpool import release_connection

        try:
            text = recover_stale_runs()
            if text != "requeued []":
                log.warning("lease recovery: %s", text)
        except Exception as exc:  # the database is away, say: the next check retries
            log.warning("lease recovery failed (%s: %s); retrying", type(exc).__name__, exc)
        finally:
            release_connection()

    def take(self, ack_id) -> None:
        with self.taken_lock:
            self.taken.add(ack_id)

    def release(self, ack_id) -> None:
        with self.taken_lock:
            self.taken.discard(ack_id)

    def hold(self) -> None:
        """Keep the tasks this process is still working on (a long schedule, a slow delivery, a run
        not claimed yet) from being delivered again: the queue's ``retry`` is a couple of leases,
        how long a lost worker's tasks wait, not how long a task may take."""
        from deputies.broker import hold
        from sessions.workpool import release_connection

        with self.taken_lock:
            ids = sorted(self.taken)
        try:
            hold(ids)
        except Exception as exc:  # the database is away: the next pass retries
            log.warning("could not hold tasks %s (%s: %s)", ids, type(exc).__name__, exc)
        finally:
            release_connection()

    def handle(self, ack_id, payload) -> None:
        """One task taken from the queue, on a run slot reserved for it."""
        from django_q.conf import Conf
        from django_q.signing import BadSignature, SignedPackage

        try:
            task = SignedPackage.loads(payload)
        except (TypeError, BadSignature):
            log.exception("dropping a task that does not verify")
            self.broker.fail(ack_id)
            self.pool.unreserve()
            return
        task["cluster"], task["ack_id"] = Conf.CLUSTER_NAME, ack_id
        if task["func"] == RUN_TASK and task["args"]:
            self.start_run(task)
            return
        self.pool.unreserve()
        self.take(ack_id)
        if task["func"] == DELIVERY_TASK:
            self.deliveries.submit(self.deliver, task)
            return
        self.side.submit(self.call, task)

    def deliver(self, task: dict) -> None:
        """One delivery attempt. The Delivery row and its attempt log are the record (no result
        row); the task is acknowledged whatever happened, since the row's lease and
        ``recover_stale_deliveries`` are what retry it."""
        from django.db import connection

        try:
            f = pydoc.locate(DELIVERY_TASK)
            log.debug("delivery %s: %s", task["args"], f(*task["args"], **task["kwargs"]))
        except Exception:
            log.exception("delivery task %s failed", task.get("name"))
        finally:
            try:
                self.broker.acknowledge(task["ack_id"])
            except Exception:
                log.exception("could not acknowledge delivery task %s", task.get("name"))
            self.release(task["ack_id"])
            connection.close()

    def start_run(self, task: dict) -> None:
        """Hand the task to a run thread on the slot reserved for it, and go back to the queue.

        The thread claims and acknowledges in one statement: a run that was claimed is its
        lease's, not the queue's, to retry, and one that could not be claimed (the database is
        away) is left unacknowledged, so the queue delivers it again. Claiming on the run's own
        thread keeps this loop (one per process) from waiting on the database for every run it
        dispatches.
        """
        from django.db import connection

        run_id = int(task["args"][0])
        self.take(task["ack_id"])
        try:
            self.pool.start(run_id, lambda: self.claim_and_run(run_id, task["ack_id"]))
        except BaseException:
            self.release(task["ack_id"])
            raise
        finally:
            connection.close()  # the loop holds no connection while it waits for work

    def claim_and_run(self, run_id: int, ack_id) -> str:
        from sessions.runner import Runner, claim

        try:
            run, why = claim(run_id, ack_id)  # acknowledges the task (with the claim, on Postgres)
        except Exception:
            log.exception("could not claim run %s; the queue will deliver it again", run_id)
            return "not claimed"
        finally:
            self.release(ack_id)
        if run is None:
            return why
        return Runner(run).execute()

    def call(self, task: dict) -> None:
        """Any other task, with its result saved the way qcluster's monitor does."""
        from django.db import connection
        from django.utils import timezone
        from django_q.monitor import save_task

        func = task["func"]
        try:
            f = func if callable(func) else pydoc.locate(func)
            if f is None:
                raise ValueError(f"Function {func} is not defined")
            task["result"], task["success"] = f(*task["args"], **task["kwargs"]), True
        except Exception as exc:
            task["result"], task["success"] = f"{exc} : {traceback.format_exc()}", False
            log.error("task %s failed: %s", task.get("name"), exc)
        task["stopped"] = timezone.now()
        try:
            save_task(task, self.broker)
            if task["success"] or task.get("ack_failure"):
                self.broker.acknowledge(task["ack_id"])
        finally:
            self.release(task["ack_id"])
            connection.close()

    def shutdown(self) -> int:
        """Stop taking work; let runs finish within DEPUTIES_WORKER_GRACE, hand the rest over."""
        from django.conf import settings

        from sessions.workpool import hand_over

        self.beat(gone=True)
        self.side.shutdown(wait=True, cancel_futures=True)
        self.deliveries.shutdown(wait=True, cancel_futures=True)
        if self.pool.in_flight():
            log.warning(
                "worker stopping: waiting up to %ss for %d runs",
                settings.WORKER_GRACE,
                len(self.pool.running),
            )
        left = self.pool.drain(settings.WORKER_GRACE)
        if left:
            hand_over(left)
            logging.shutdown()
            os._exit(0)  # the threads of the runs handed over must not go on writing
        return 0


def raise_open_files_limit() -> int:
    """Lift this process's soft limit on open files to its hard limit; returns the new soft limit.

    Every running run holds a socket to its model and, while a command runs, its pipes, so a
    process with hundreds of runs needs more than the soft limit of 1,024 that many hosts start
    with (a run past it fails with "Too many open files"). The hard limit stays the operator's."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:  # e.g. a hard limit the kernel caps lower (nr_open)
            log.warning("could not raise the open files limit from %s to %s: %s", soft, hard, exc)
    return soft


def main() -> int:
    files = raise_open_files_limit()
    worker = Worker()
    if files != -1 and files < 4 * worker.pool.size + 64:  # -1: RLIM_INFINITY
        log.warning(
            "the open files limit (%s) is low for %d runs per process; raise it (ulimit -n)",
            files,
            worker.pool.size,
        )
    return worker.serve()

"""django-q2's ORM broker, woken by Postgres LISTEN/NOTIFY instead of waiting out its poll interval.

Enqueueing sends ``NOTIFY deputies_queue`` (delivered at commit); an idle worker blocks in LISTEN on
its own connection for up to ``poll`` seconds and checks the table as soon as a notification lands.
Polling stays as the fallback (lost notifications, SQLite), so the poll interval can be long and an
idle cluster costs few transactions.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from time import sleep

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.conf import Conf
from django_q.models import OrmQ

log = logging.getLogger(__name__)
CHANNEL = "deputies_queue"


def is_postgres(alias: str) -> bool:
    return connections[alias].vendor == "postgresql"


def listen_kwargs(alias: str = "default") -> dict:
    """psycopg arguments for a dedicated autocommit connection (LISTEN must not share Django's)."""
    s = connections[alias].settings_dict
    return {
        "dbname": s["NAME"],
        "user": s["USER"] or None,
        "password": s["PASSWORD"] or None,
        "host": s["HOST"] or None,
        "port": s["PORT"] or None,
        "autocommit": True,
        "connect_timeout": 5,
    }


def listen_connection(alias: str):
    import psycopg

    return psycopg.connect(**listen_kwargs(alias))


def queue_joins_transaction() -> bool:
    """Whether an enqueue can be part of the caller's transaction: this broker, on the default
    database (Postgres or SQLite: the queue row commits with the caller's rows, or neither does), not
    in sync mode (which would run the task inside the transaction)."""
    return (
        not Conf.SYNC
        and Conf.BROKER_CLASS == f"{__name__}.{NotifyingORM.__name__}"
        and Conf.ORM == DEFAULT_DB_ALIAS
    )


# The row and the wake-up in one statement; inside a transaction the NOTIFY goes out at its commit.
_ENQUEUE = """
WITH q AS (INSERT INTO {table} (key, payload, lock) VALUES (%s, %s, %s) RETURNING id)
SELECT id, pg_notify(%s, '') FROM q
"""
# Take up to BULK due tasks in one statement; SKIP LOCKED lets concurrent clusters take others.
_DEQUEUE = """
UPDATE {table} SET lock = %s
WHERE id IN (
    SELECT id FROM {table} WHERE key = %s AND lock < %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
)
RETURNING id, payload
"""


def _cursor():
    """The queue's statements are prepared once per connection (on the default database, which
    the ORM broker uses unless told otherwise)."""
    if Conf.ORM != DEFAULT_DB_ALIAS:
        return connections[Conf.ORM].cursor()
    from sessions.columns import prepared_cursor

    return prepared_cursor()


def _execute(sql: str, params: list, fetch: bool = False) -> list | None:
    """One queue statement; a dropped connection gets one fresh try now, else the caller's (the
    pusher's, the monitor's) own error handling."""
    for last in (False, True):
        try:
            with _cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if fetch else None
        except DatabaseError:
            if last:
                raise
            connections[Conf.ORM].close()
    return None


class NotifyingORM(ORM):
    """On Postgres, enqueue and dequeue are one statement each (django-q2's ORM broker takes two,
    and 1 + N for a dequeue, each after a connection check)."""

    _listener = None

    def enqueue(self, task):
        if not is_postgres(Conf.ORM):
            return super().enqueue(task)
        sql = _ENQUEUE.format(table=OrmQ._meta.db_table)
        with _cursor() as cursor:
            cursor.execute(sql, [self.list_key or Conf.CLUSTER_NAME, task, timezone.now(), CHANNEL])
            return cursor.fetchone()[0]

    def dequeue(self, limit: int | None = None):
        """Up to ``limit`` (else ``bulk``) due tasks, locked until ``retry`` from now."""
        limit = limit or Conf.BULK
        if not is_postgres(Conf.ORM):
            tasks = self.get_connection().filter(key=self.list_key, lock__lt=timezone.now())[0:limit]
            if tasks:
                return self._lock(tasks)
            self._wait(Conf.POLL)
            return None
        now = timezone.now()
        sql = _DEQUEUE.format(table=OrmQ._meta.db_table)
        params = [now + timedelta(seconds=Conf.RETRY), self.list_key, now, limit]
        rows = _execute(sql, params, fetch=True)
        if rows:
            return sorted(rows)
        self._wait(Conf.POLL)
        return None

    def delete(self, task_id):
        """The acknowledgement (once per task, in the monitor): one plain statement."""
        if not is_postgres(Conf.ORM):
            return super().delete(task_id)
        _execute(f"DELETE FROM {OrmQ._meta.db_table} WHERE id = %s", [task_id])

    def _lock(self, tasks):
        task_list = []
        for task in tasks:
            if self.get_connection().filter(id=task.id, lock=task.lock).update(lock=self.timeout(task)):
                task_list.append((task.pk, task.payload))
        return task_list

    def _wait(self, timeout: float) -> None:
        if not is_postgres(Conf.ORM):
            sleep(timeout)
            return
        try:
            if self._listener is None or self._listener.closed:
                self._listener = listen_connection(Conf.ORM)
                self._listener.execute(f"LISTEN {CHANNEL}")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                break
        except Exception as exc:  # fall back to plain polling; reconnect next time
            log.warning("queue LISTEN failed (%s); polling instead", exc)
            if self._listener is not None:
                self._listener.close()
            self._listener = None
            sleep(timeout)


def acknowledge(task_id) -> None:
    """Delete a taken task: it is done, or something else (a run's lease) looks after it now."""
    from django_q.brokers import get_broker

    get_broker().acknowledge(task_id)


def hold(task_ids: list) -> None:
    """Push back the redelivery of tasks this process is still working on by another ``retry``
    (deputies/worker.py, every third of it): ``retry`` only has to outlast a lost worker, not the
    longest task."""
    if not task_ids:
        return
    lock = timezone.now() + timedelta(seconds=Conf.RETRY)
    if not is_postgres(Conf.ORM):
        OrmQ.objects.using(Conf.ORM).filter(pk__in=task_ids).update(lock=lock)
        return
    _execute(f"UPDATE {OrmQ._meta.db_table} SET lock = %s WHERE id = ANY(%s)", [lock, list(task_ids)])


class _Deferred:
    """Puts a task in the queue table with its lock at ``eta``: ``dequeue`` only takes rows whose lock
    has passed, so the table itself is the due-time queue (no worker thread sleeps on it, and the
    idle worker's usual poll is what notices the task once it is due)."""

    def __init__(self, broker, eta) -> None:
        self.broker, self.eta = broker, eta
        self.list_key = broker.list_key

    def enqueue(self, task) -> int:
        return OrmQ.objects.using(Conf.ORM).create(key=self.list_key, payload=task, lock=self.eta).pk


def enqueue_at(eta, func: str, *args, **kwargs):
    """``async_task`` for a task due at ``eta`` (a datetime); with the ORM broker only."""
    from django_q.brokers import get_broker
    from django_q.tasks import async_task

    if eta <= timezone.now():
        return async_task(func, *args, **kwargs)
    return async_task(func, *args, broker=_Deferred(get_broker(), eta), **kwargs)

"""django-q2's ORM broker, woken by Postgres LISTEN/NOTIFY instead of waiting out its poll interval.

Enqueueing sends ``NOTIFY deputies_queue`` (delivered at commit); an idle worker blocks in LISTEN on
its own connection for up to ``poll`` seconds and checks the table as soon as a notification lands.
Polling stays as the fallback (lost notifications, SQLite), so the poll interval can be long and an
idle cluster costs few transactions.
"""

from __future__ import annotations

import logging
from time import sleep

from django.db import connections
from django_q.brokers.orm import ORM
from django_q.conf import Conf

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


class NotifyingORM(ORM):
    _listener = None

    def enqueue(self, task):
        pk = super().enqueue(task)
        if is_postgres(Conf.ORM):
            with connections[Conf.ORM].cursor() as cursor:
                cursor.execute(f"NOTIFY {CHANNEL}")
        return pk

    def dequeue(self):
        tasks = self.get_connection().filter(key=self.list_key, lock__lt=self._now())[0 : Conf.BULK]
        if tasks:
            return self._lock(tasks)
        self._wait(Conf.POLL)
        return None

    def _now(self):
        from django.utils import timezone

        return timezone.now()

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

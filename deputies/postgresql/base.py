"""Django's PostgreSQL backend, but the pool checks a connection without a round trip.

With ``CONN_HEALTH_CHECKS`` Django gives psycopg_pool ``ConnectionPool.check_connection``, which
sends an empty query on every check-out: a worker gives its connection back before each model call
and each tool run (sessions/workpool.py), so that was two round trips per agent step. Here a
check-out first asks the socket, at no cost: a connection the server closed (a restart, a failover,
``pg_terminate_backend``, an idle timeout) has the server's goodbye or the end of the stream waiting
on it, and only then does the pool's own check run, fail, and get a fresh connection in its place.
A connection that breaks while in use is dropped by the pool when it comes back, as before.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base
from psycopg import OperationalError
from psycopg_pool import ConnectionPool


def check_connection(conn) -> None:
    """Raise if ``conn`` is closed or the server has sent it something (most likely its goodbye)."""
    if conn.closed:
        raise OperationalError("the connection is closed")
    waiting = select.poll()
    waiting.register(conn.fileno(), select.POLLIN)
    if waiting.poll(0):
        ConnectionPool.check_connection(conn)


class DatabaseWrapper(base.DatabaseWrapper):
    @property
    def pool(self):
        pool = super().pool
        if pool is not None and pool._check is ConnectionPool.check_connection:
            pool._check = check_connection  # the one Django passes for CONN_HEALTH_CHECKS
        return pool

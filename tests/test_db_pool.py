"""The worker's pooled Postgres connections (deputies/postgresql): a check-out costs no round trip,
and a connection the server closed while it sat in the pool is never handed out."""

from __future__ import annotations

import psycopg
import pytest
from django.db import connection

from tests.live import wait_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def pool():
    if connection.vendor != "postgresql" or connection.pool is None:
        pytest.skip("needs Postgres with the connection pool")
    return connection.pool


@pytest.fixture
def observer(pool):
    """A connection of its own, outside the pool; autocommit, so each statement sees
    pg_stat_activity afresh."""
    with psycopg.connect(**pool.kwargs) as conn:
        yield conn


def check_out(pool, pid: int):
    """Take idle connections (the pool hands them out oldest first) until backend ``pid`` comes."""
    taken = []
    try:
        for _ in range(pool.get_stats()["pool_available"]):
            taken.append(pool.getconn())
            if taken[-1].info.backend_pid == pid:
                return taken.pop()
        raise AssertionError(f"backend {pid} was not handed out again")
    finally:
        for conn in taken:
            pool.putconn(conn)


def last_query(observer, pid: int) -> str | None:
    row = observer.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row[0] if row else None


def test_it_checks_out_a_pooled_connection_without_a_round_trip(pool, observer):
    conn = pool.getconn()
    pid = conn.info.backend_pid
    conn.execute("SELECT 'the last thing it ran'")
    pool.putconn(conn)
    conn = check_out(pool, pid)
    try:
        assert last_query(observer, pid) == "SELECT 'the last thing it ran'"  # no check query went out
    finally:
        pool.putconn(conn)


def test_it_never_hands_out_a_pooled_connection_the_server_closed(pool, observer):
    conn = pool.getconn()
    dead = conn.info.backend_pid
    pool.putconn(conn)
    assert observer.execute("SELECT pg_terminate_backend(%s)", [dead]).fetchone()[0]
    wait_for(lambda: last_query(observer, dead) is None, timeout=10, what=f"backend {dead} to end")
    idle = pool.get_stats()["pool_available"]  # the dead one among them
    taken = [pool.getconn() for _ in range(idle)]
    try:
        assert dead not in {conn.info.backend_pid for conn in taken}
        assert all(conn.execute("SELECT 1").fetchone() == (1,) for conn in taken)
    finally:
        for conn in taken:
            pool.putconn(conn)

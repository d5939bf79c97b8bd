"""``sessions.columns.default_connection``: the connection Django's own lookup gives, wherever it runs."""

from __future__ import annotations

import asyncio
import threading

from django.db import DEFAULT_DB_ALIAS, connections

from sessions.columns import default_connection


def in_thread(fn):
    box: dict = {}

    def run() -> None:
        box["value"] = fn()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    return box["value"]


def test_it_is_djangos_connection_of_this_thread() -> None:
    assert default_connection() is connections[DEFAULT_DB_ALIAS]
    assert default_connection() is default_connection()


def test_a_new_thread_gets_its_own_connection_from_the_first_call() -> None:
    first, again, djangos = in_thread(
        lambda: (default_connection(), default_connection(), connections[DEFAULT_DB_ALIAS])
    )
    assert first is again is djangos
    assert first is not connections[DEFAULT_DB_ALIAS]


def test_under_a_running_event_loop_it_is_the_one_of_that_context() -> None:
    """With a loop running, asgiref keeps connections per context, not per thread."""

    async def both():
        return default_connection(), connections[DEFAULT_DB_ALIAS]

    def run():
        default_connection()  # this thread's own, outside the loop
        outside = connections[DEFAULT_DB_ALIAS]
        inside, djangos = asyncio.run(both())
        return outside, inside, djangos

    outside, inside, djangos = in_thread(run)
    assert inside is djangos
    assert inside is not outside

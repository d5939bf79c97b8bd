"""The emitting side: when an emit() commits, tell every web process, once.

One message per emit() call (on Postgres: per session per insert statement, which may carry several
concurrent emit() calls), whatever the number of subscribers: ``{"s": session, "m": last seq,
"n": count, "e": [events]}``. On Postgres the ``pg_notify`` is part of emit()'s own insert statement
(``events._PG_INSERT``), so it is delivered exactly at commit and costs no
round trip; Redis and poll mode use ``publish`` after commit. ``e`` is left out when the message would not fit (Postgres NOTIFY
payloads stop at 8000 bytes); receivers then read those rows themselves. A failed notification is
logged, never raised: the rows are committed and subscribers catch up from them (safety poll,
reconnect with ``after``), so a broken notifier must not break the run that emitted.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from sessions.streaming.store import dumps, event_data

if TYPE_CHECKING:
    from sessions.models import Event

log = logging.getLogger(__name__)

PG_CHANNEL = "deputies_events"
LIMITS = {"postgres": 7000, "redis": 512 * 1024, "poll": 512 * 1024}
_WARN_EVERY = 10.0


def encode(events: list[Event], limit: int) -> str:
    head: dict[str, Any] = {"s": events[0].session_id, "m": events[-1].seq, "n": len(events)}
    full = dumps({**head, "e": [event_data(e) for e in events]})
    if len(full.encode()) <= limit:
        return full
    return dumps(head)


def redis_channel() -> str:
    """Redis pub/sub is not scoped by database number, so the channel names the database whose rows
    the messages are about: two deployments (or two test databases) sharing a Redis stay apart."""
    db = settings.DATABASES["default"]
    return f"deputies:events:{db.get('HOST') or ''}:{db['NAME']}"


class _Redis:
    clients: dict[str, Any] = {}
    lock = threading.Lock()

    @classmethod
    def get(cls, url: str):
        client = cls.clients.get(url)
        if client is None:
            with cls.lock:
                client = cls.clients.get(url)
                if client is None:
                    import redis

                    client = cls.clients[url] = redis.Redis.from_url(
                        url, socket_connect_timeout=1, socket_timeout=1
                    )
        return client


class _Warnings:
    """At most one warning per interval, with the count of failures in between."""

    last = 0.0
    suppressed = 0

    @classmethod
    def warn(cls, backend: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - cls.last < _WARN_EVERY:
            cls.suppressed += 1
            return
        extra = f" ({cls.suppressed} more since the last warning)" if cls.suppressed else ""
        log.warning("event notification over %s failed: %s%s", backend, exc, extra)
        cls.last, cls.suppressed = now, 0


def publish(events: list[Event]) -> None:
    """The emit() listener; runs after commit, in whichever process emitted."""
    if not events:
        return
    backend = settings.STREAM_BACKEND
    try:
        message = encode(events, LIMITS[backend])
        if backend == "postgres":
            with connections[DEFAULT_DB_ALIAS].cursor() as cursor:  # emit() does this in its statement
                cursor.execute("SELECT pg_notify(%s, %s)", [PG_CHANNEL, message])
        elif backend == "redis":
            _Redis.get(settings.REDIS_URL).publish(redis_channel(), message)
        else:
            # Subscribers in this process hear it now; other processes find the rows by polling.
            from sessions.streaming.hub import deliver_local

            deliver_local(message)
    except Exception as exc:  # noqa: BLE001 - a notification must never fail the emit
        _Warnings.warn(backend, exc)

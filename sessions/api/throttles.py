"""API rate limits: DRF throttling (429, ``Retry-After``, the JSON error body), counted per token or user.

Two rates (settings): ``DEPUTIES_API_RATE`` for every API request of one client, and the stricter
``DEPUTIES_API_RATE_SESSIONS`` for starting sessions (each starts a run, the expensive thing). A
client is its bearer token when it sends one (two tokens of one user are two clients), else its
user. Anonymous requests are refused by authentication before throttling.

Counting is a fixed window per rate (``600/min``: at most 600 in each calendar minute), kept where
every web process sees it (``DEPUTIES_RATE_LIMIT_STORE``):

* ``redis``: ``INCR`` + ``EXPIRE`` in one pipeline;
* ``database``: one upsert into ``RateCounter`` for all the rates a request counts against, so a
  request costs one statement. (Django's database cache would cost five or six per rate: it
  counts its table on every write, and DRF's throttle stores the timestamps of every request);
* ``memory``: per process; fine for Simple mode, which has one web process.

A fixed window lets a client send up to twice the rate across a window boundary; that is the
price of one counter per client instead of a log of its requests.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from rest_framework.throttling import BaseThrottle

from deputies.env import RATE_RE

_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate: str | None) -> tuple[int, int] | None:
    """``"600/min"`` -> (600, 60); None for no limit. Settings validate with ``RATE_RE`` first."""
    if not rate:
        return None
    match = RATE_RE.match(rate)
    if match is None:
        raise ValueError(f"not a rate: {rate!r}")
    return int(match.group(1)), _PERIODS[match.group(2)[0]]


@dataclass(frozen=True)
class Window:
    key: str
    limit: int
    seconds: int


def _client(request) -> str | None:
    from sessions.models import APIToken

    if isinstance(request.auth, APIToken):
        return f"token:{request.auth.pk}"
    user = request.user
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return None


class APIRateThrottle(BaseThrottle):
    """Every rate the request counts against, in one round trip to the store."""

    def allow_request(self, request, view) -> bool:
        self._wait = None
        client = _client(request)
        if client is None:
            return True
        windows = []
        if general := parse_rate(settings.API_RATE):
            windows.append(Window(f"api:{client}", *general))
        if getattr(view, "throttle_scope", None) == "sessions" and getattr(view, "action", None) == "create":
            if sessions := parse_rate(settings.API_RATE_SESSIONS):
                windows.append(Window(f"sessions:{client}", *sessions))
        if not windows:
            return True
        now = time.time()
        counts = get_store().hit(windows, now)
        waits = [
            (math.floor(now / w.seconds) + 1) * w.seconds - now
            for w, count in zip(windows, counts, strict=True)
            if count > w.limit
        ]
        if waits:
            self._wait = max(1.0, math.ceil(max(waits)))
            return False
        return True

    def wait(self) -> float | None:
        return self._wait


class MemoryStore:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, tuple[int, int]] = {}  # key -> (window start, hits)

    def hit(self, windows: list[Window], now: float) -> list[int]:
        result = []
        with self.lock:
            if len(self.counts) > 10_000:
                self.counts.clear()  # windows of old clients; at worst a fresh window for everyone
            for w in windows:
                start = int(now // w.seconds) * w.seconds
                seen, hits = self.counts.get(w.key, (start, 0))
                hits = hits + 1 if seen == start else 1
                self.counts[w.key] = (start, hits)
                result.append(hits)
        return result


class RedisStore:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def hit(self, windows: list[Window], now: float) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for w in windows:
            start = int(now // w.seconds) * w.seconds
            key = f"deputies:rate:{w.key}:{start}"
            pipe.incr(key)
            pipe.expire(key, w.seconds + 1)
        replies = pipe.execute()
        return [int(n) for n in replies[::2]]


class DatabaseStore:
    """One row per client and rate; a new window resets the row."""

    def hit(self, windows: list[Window], now: float) -> list[int]:
        from sessions.models import RateCounter

        table = connection.ops.quote_name(RateCounter._meta.db_table)
        values, params = [], []
        for w in windows:
            values.append("(%s, %s, 1)")
            params += [w.key, int(now // w.seconds) * w.seconds]
        if connection.vendor == "postgresql":
            upsert = (
                "ON CONFLICT (key) DO UPDATE SET hits = CASE WHEN t.window_start = EXCLUDED.window_start "
                "THEN t.hits + 1 ELSE 1 END, window_start = EXCLUDED.window_start"
            )
            sql = f"INSERT INTO {table} AS t (key, window_start, hits) VALUES {', '.join(values)} {upsert} RETURNING key, hits"
        else:  # SQLite >= 3.35 has the same upsert, with the table's own name instead of an alias
            upsert = (
                f"ON CONFLICT (key) DO UPDATE SET hits = CASE WHEN {table}.window_start = excluded.window_start "
                f"THEN {table}.hits + 1 ELSE 1 END, window_start = excluded.window_start"
            )
            sql = f"INSERT INTO {table} (key, window_start, hits) VALUES {', '.join(values)} {upsert} RETURNING key, hits"
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            hits = dict(cursor.fetchall())
        return [hits[w.key] for w in windows]


_store = None
_store_lock = threading.Lock()


def get_store():
    global _store
    with _store_lock:
        if _store is None:
            kind = settings.RATE_LIMIT_STORE
            if kind == "redis":
                _store = RedisStore(settings.REDIS_URL)
            elif kind == "database":
                _store = DatabaseStore()
            else:
                _store = MemoryStore()
        return _store


def reset_store() -> None:
    """Forget the store (tests change the setting)."""
    global _store
    with _store_lock:
        _store = None

"""The receiving side: one listener per web process, fanning out to its websocket consumers.

A consumer subscribes to a session with an object whose ``push(note)`` the hub calls, in order, for
each ``Note``; list subscribers give a queue for list frames. 100 subscribers on one session cost one
notification, one JSON decode and one frame encoding per event in this process, then 100 ``push``
calls (each, for a consumer that is caught up under daphne, one socket write: see ``wire``).

Sources, by ``settings.STREAM_BACKEND``:

- ``postgres``: ``LISTEN deputies_events`` on a dedicated psycopg ``AsyncConnection``;
- ``redis``: a ``redis.asyncio`` pub/sub subscription;
- ``poll``: the database every ``STREAM_POLL_INTERVAL`` seconds (SQLite Simple mode, where the
  worker is another process), plus events emitted inside this process, delivered at once.

With a listener, the same poll runs every ``STREAM_SAFETY_POLL_INTERVAL`` seconds as a net for lost
notifications. When the listener connection drops it reconnects with backoff and then re-checks
every subscribed session against the database, since notifications sent meanwhile are gone.

The hub lives on the event loop that first needed it (daphne has one per process; tests get one per
test). Notes for one session are delivered in order. Whatever the subscribers would each have to read
from the database (a notification too large to carry its events, one that arrives out of order or
never arrives) is read once here, and later notes for that session wait behind the read. Notes that
arrive together are merged, so a burst reaches each subscriber in one socket write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from sessions.streaming import store
from sessions.streaming.notify import PG_CHANNEL, redis_channel
from sessions.streaming.wire import frame_bytes

log = logging.getLogger(__name__)

READY_TIMEOUT = 5.0
MIN_BACKOFF = 0.05
MAX_BACKOFF = 5.0
# Beyond this many missing events a note says only "read from the database" and each consumer pages.
HUB_FETCH_LIMIT = store.PAGE


Frame = tuple[int, str, bytes]  # seq, JSON text, the same as a complete websocket frame


@dataclass(frozen=True, slots=True)
class Note:
    """Events up to ``max_seq`` are committed; ``frames`` are the last of them, contiguous.
    Empty ``frames``: read what you miss from the database."""

    max_seq: int
    frames: tuple[Frame, ...] = ()
    # All the frames' bytes, joined once here rather than by each of the subscribers.
    data: bytes = field(init=False, default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", b"".join(frame[2] for frame in self.frames))


class Subscriber(Protocol):
    def push(self, note: Note) -> None: ...


def framed(seq: int, text: str) -> Frame:
    return (seq, text, frame_bytes(text))


@dataclass(slots=True)
class _Fetch:
    after: int
    upto: int


@dataclass(slots=True)
class _Topic:
    subscribers: set[Subscriber] = field(default_factory=set)
    known: int = 0  # the highest seq already fanned out (or present when the topic started)
    busy: bool = False
    backlog: deque[Note | _Fetch] = field(default_factory=deque)


def _db(fn):
    """ORM work off the event loop; connections are recycled like channels' database_sync_to_async."""

    def call(*args, **kwargs):
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(call, thread_sensitive=True)


class Hub:
    def __init__(self, loop: asyncio.AbstractEventLoop, backend: str) -> None:
        self.loop = loop
        self.backend = backend
        self.topics: dict[int, _Topic] = {}
        self.lists: dict[asyncio.Queue, frozenset[int] | None] = {}
        self.ready = asyncio.Event()
        self.closed = False
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._list_pending: set[int] = set()
        self._list_wakeup = asyncio.Event()
        self._list_cursor: int | None = None  # poll mode: last Event id looked at
        self._pending: dict[int, list[Note | _Fetch]] = {}
        self._flush_scheduled = False
        self.reconnects = 0
        self._lost_at: datetime | None = None
        self._backoff = MIN_BACKOFF

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe_session(self, session_id: int, subscriber: Subscriber) -> None:
        """Register before the consumer replays from the database, so nothing falls in between."""
        self._start()
        await self._wait_ready()
        topic = self.topics.get(session_id)
        if topic is None:
            topic = self.topics[session_id] = _Topic()
            topic.subscribers.add(subscriber)
            last = (await _db(store.last_seqs)([session_id])).get(session_id, 0)
            topic.known = max(topic.known, last)
        else:
            topic.subscribers.add(subscriber)

    def unsubscribe_session(self, session_id: int, subscriber: Subscriber) -> None:
        topic = self.topics.get(session_id)
        if topic is None:
            return
        topic.subscribers.discard(subscriber)
        if not topic.subscribers and not topic.busy:
            del self.topics[session_id]

    async def subscribe_list(self, queue: asyncio.Queue, teams: frozenset[int] | None) -> None:
        self._start()
        await self._wait_ready()
        if self.backend == "poll" and self._list_cursor is None:
            self._list_cursor = await _db(store.max_event_id)()
        self.lists[queue] = teams

    def unsubscribe_list(self, queue: asyncio.Queue) -> None:
        self.lists.pop(queue, None)

    # --- incoming notifications -----------------------------------------------------------------

    def on_message(self, text: str | bytes) -> None:
        """One notification (see ``notify.encode``); runs on the hub's loop."""
        if self._take(text) and not self._flush_scheduled:
            # Fan out once the listener has handed over everything that arrived together, so a
            # burst of events reaches each subscriber in one socket write instead of one each.
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _take(self, text: str | bytes) -> bool:
        """Queue a notification's note for ``_flush``; True when there is one to fan out."""
        try:
            message = json.loads(text)
            session_id, max_seq = int(message["s"]), int(message["m"])
            count = int(message.get("n", 1))
            events = message.get("e")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed event notification: %s", exc)
            return False
        if self.lists and (not events or any(ev.get("type") in store.LIST_TYPES for ev in events)):
            self._list_pending.add(session_id)
            self._list_wakeup.set()
        if session_id not in self.topics:
            return False
        if events:
            frames = tuple(framed(int(ev["seq"]), store.event_frame(ev)) for ev in events)
            item: Note | _Fetch = Note(max_seq, frames)
        else:
            item = _Fetch(max_seq - count, max_seq)
        self._pending.setdefault(session_id, []).append(item)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for session_id, items in pending.items():
            topic = self.topics.get(session_id)
            if topic is None:
                continue
            merged: list[Note | _Fetch] = []
            for item in items:
                last = merged[-1] if merged else None
                if (
                    isinstance(item, Note)
                    and isinstance(last, Note)
                    and item.frames
                    and last.frames
                    and item.frames[0][0] == last.max_seq + 1
                ):
                    merged[-1] = Note(item.max_seq, last.frames + item.frames)
                else:
                    merged.append(item)
            for item in merged:
                self._deliver(session_id, topic, item)

    def _deliver(self, session_id: int, topic: _Topic, item: Note | _Fetch) -> None:
        if topic.busy:
            topic.backlog.append(item)
            return
        item = self._fit(topic, item)
        if item is None:
            return
        if isinstance(item, Note):
            self._fan_out(topic, item)
        else:
            topic.busy = True
            topic.backlog.append(item)
            self._spawn(self._drain(session_id, topic))

    @staticmethod
    def _fit(topic: _Topic, item: Note | _Fetch) -> Note | _Fetch | None:
        """What to do with an item given what was fanned out already: nothing (old news), fan it
        out (it continues ``known``), or read the missing range here, once for every subscriber.

        Notifications can arrive out of order (two writers to one session notify after their
        commits, in either order) or be lost; either way this process reads the gap once, instead
        of each of its subscribers noticing the gap and reading it on its own."""
        if isinstance(item, Note):
            if item.max_seq <= topic.known:
                return None
            if item.frames and item.frames[0][0] <= topic.known + 1:
                return item
            return _Fetch(topic.known, item.max_seq)
        if item.upto <= topic.known:
            return None
        return _Fetch(max(item.after, topic.known), item.upto)

    def _fan_out(self, topic: _Topic, note: Note) -> None:
        if note.max_seq > topic.known:
            topic.known = note.max_seq
        for subscriber in list(topic.subscribers):
            try:
                subscriber.push(note)
            except Exception:  # one broken consumer must not starve the others
                log.exception("pushing to a websocket consumer failed")

    async def _drain(self, session_id: int, topic: _Topic) -> None:
        """Resolve fetches in order, so notes for one session never overtake each other."""
        try:
            while topic.backlog:
                item = self._fit(topic, topic.backlog.popleft())
                if item is None:
                    continue
                if isinstance(item, Note):
                    self._fan_out(topic, item)
                    continue
                if item.upto - item.after > HUB_FETCH_LIMIT:
                    self._fan_out(topic, Note(item.upto))  # too much: consumers page through it
                    continue
                try:
                    frames = await _db(store.read_event_frames)(session_id, item.after, item.upto)
                except Exception as exc:  # noqa: BLE001 - consumers fall back to their own reads
                    log.warning("reading events of session %s failed: %s", session_id, exc)
                    frames = []
                self._fan_out(topic, Note(item.upto, tuple(framed(seq, text) for seq, text in frames)))
        finally:
            topic.busy = False
            if not topic.subscribers and self.topics.get(session_id) is topic:
                del self.topics[session_id]

    # --- the session list -----------------------------------------------------------------------

    async def _list_worker(self) -> None:
        """One at a time, so a slow read cannot deliver an older state after a newer one."""
        while True:
            await self._list_wakeup.wait()
            self._list_wakeup.clear()
            pending, self._list_pending = self._list_pending, set()
            if not pending or not self.lists:
                continue
            try:
                rows = await _db(store.session_rows)(pending)
            except Exception as exc:  # noqa: BLE001
                log.warning("reading sessions for the list channel failed: %s", exc)
                continue
            for team_id, data in rows:
                frame = store.session_frame(data)
                for queue, teams in list(self.lists.items()):
                    if teams is None or team_id in teams:
                        queue.put_nowait(frame)

    # --- sources --------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._spawn(self._list_worker())
        if self.backend == "postgres":
            self._spawn(self._listen(self._postgres))
        elif self.backend == "redis":
            self._spawn(self._listen(self._redis))
        else:
            self.ready.set()
        interval = (
            settings.STREAM_POLL_INTERVAL if self.backend == "poll" else settings.STREAM_SAFETY_POLL_INTERVAL
        )
        self._spawn(self._poll_loop(interval))

    async def _wait_ready(self) -> None:
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            # Keep going on the poll; the listener re-checks every session once it connects.
            log.warning(
                "event listener (%s) not ready after %ss; relying on polling", self.backend, READY_TIMEOUT
            )

    async def _listen(self, connect_and_listen) -> None:
        while not self.closed:
            try:
                await connect_and_listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect whatever went wrong
                log.warning(
                    "event listener (%s) lost: %s; reconnecting in %.2fs", self.backend, exc, self._backoff
                )
            self.ready.clear()
            if self._lost_at is None:
                self._lost_at = datetime.now(UTC)
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    async def _connected(self) -> None:
        """LISTEN is active: from here on nothing is missed. Catch up on what may have been."""
        lost_at, self._lost_at = self._lost_at, None
        self._backoff = MIN_BACKOFF
        self.ready.set()
        if lost_at is not None:
            self.reconnects += 1
            log.info("event listener (%s) reconnected", self.backend)
        await self._check_sessions()
        if lost_at is not None and self.lists:
            since = lost_at - timedelta(seconds=2)  # emitters' clocks and commit delays
            try:
                self._list_pending |= await _db(store.sessions_with_list_events_since)(since)
                self._list_wakeup.set()
            except Exception as exc:  # noqa: BLE001
                log.warning("re-checking the session list after a reconnect failed: %s", exc)

    async def _postgres(self) -> None:
        import psycopg

        from deputies.broker import listen_kwargs

        conn = await psycopg.AsyncConnection.connect(
            **listen_kwargs(),
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
            application_name="deputies-stream",
        )
        async with conn:
            # Notifications psycopg reads while it runs a statement on this connection (LISTEN
            # itself) come through the handler; the rest through the reader below.
            conn.add_notify_handler(lambda notification: self.on_message(notification.payload))
            await conn.execute(f"LISTEN {PG_CHANNEL}")
            lost = self.loop.create_future()
            fd = conn.fileno()
            self.loop.add_reader(fd, self._read_notifications, conn.pgconn, fd, lost)
            try:
                await self._connected()
                await lost  # raises what broke the connection
            finally:
                self.loop.remove_reader(fd)

    def _read_notifications(self, pgconn, fd: int, lost: asyncio.Future) -> None:
        """The listener's socket is readable: take every notification it holds and fan them out
        in this same callback. Compared with iterating ``AsyncConnection.notifies()``, a
        notification costs no reader registration and removal (two epoll_ctl calls), no task
        wake-up and no loop turn before the first subscriber's write. Nothing else runs statements
        on this connection, so nothing else reads from it."""
        try:
            pgconn.consume_input()  # a closed or broken connection raises here
        except Exception as exc:  # noqa: BLE001 - handed to _listen, which reconnects
            self.loop.remove_reader(fd)
            if not lost.done():
                lost.set_exception(exc)
            return
        queued = False
        while (notification := pgconn.notifies()) is not None:
            queued = self._take(notification.extra) or queued
        if queued:
            self._flush()

    async def _redis(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No silent reconnects inside redis-py: a lost connection must reach _listen, which re-checks.
        client = aioredis.Redis.from_url(
            settings.REDIS_URL,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
            client_name=f"deputies-stream-{os.getpid()}",
        )
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(redis_channel())
            await self._connected()
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self.on_message(message["data"])
        finally:
            await client.aclose()

    async def _poll_loop(self, interval: float) -> None:
        while not self.closed:
            await asyncio.sleep(interval)
            try:
                await self._check_sessions()
                if self.backend == "poll":
                    await self._poll_list()
            except Exception as exc:  # noqa: BLE001
                log.warning("polling for events failed: %s", exc)

    async def _check_sessions(self) -> None:
        """Compare each subscribed session's ``last_seq`` with what was fanned out; fetch the rest."""
        if not self.topics:
            return
        seqs = await _db(store.last_seqs)(list(self.topics))
        for session_id, last in seqs.items():
            topic = self.topics.get(session_id)
            if topic is not None and last > topic.known:
                self._deliver(session_id, topic, _Fetch(topic.known, last))

    async def _poll_list(self) -> None:
        if not self.lists:
            self._list_cursor = None  # the next list subscriber starts from the newest event
            return
        if self._list_cursor is None:
            return
        self._list_cursor, changed = await _db(store.sessions_with_list_events)(self._list_cursor)
        if changed:
            self._list_pending |= changed
            self._list_wakeup.set()

    # --- lifecycle ------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.closed:
            log.error("streaming hub task failed", exc_info=task.exception())

    async def close(self) -> None:
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_hub: Hub | None = None


def get_hub() -> Hub:
    """This process's hub, on the running loop (a new loop, as in tests, gets a new hub)."""
    global _hub
    loop = asyncio.get_running_loop()
    if _hub is None or _hub.loop is not loop or _hub.closed:
        _hub = Hub(loop, settings.STREAM_BACKEND)
    return _hub


async def close_hub() -> None:
    """Stop the listener and its connection (tests, shutdown)."""
    global _hub
    hub, _hub = _hub, None
    if hub is not None and hub.loop is asyncio.get_running_loop():
        await hub.close()


def deliver_local(message: str) -> None:
    """Poll mode: an emit() in this process reaches this process's subscribers without waiting."""
    hub = _hub
    if hub is None or hub.closed or hub.loop.is_closed():
        return
    try:
        hub.loop.call_soon_threadsafe(hub.on_message, message)
    except RuntimeError:  # the loop closed in between
        pass

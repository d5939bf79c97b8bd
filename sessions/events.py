"""The one way events are written. The database row is the truth; pushes are notifications.

Sequence numbers come from ``Session.last_seq`` bumped with ``UPDATE ... RETURNING`` inside the same
transaction as the insert, so they are gap-free: a rolled-back emit rolls back its number too.

Event types and their payloads (all JSON objects):

- ``status``            {status}
- ``message``           {message_id, content, position}
- ``run_started``       {run_id, attempt}
- ``sandbox_ready``     {sandbox_id, provider, isolated, reason?, secrets_withheld?: [names],
                        secrets_withheld_reason?}  (withheld: an unisolated sandbox, no opt-in)
- ``repository_ready``  {url, base_branch, branch, commit}
- ``setup_output``      {stream, text}  (``.deputies/setup`` output, coalesced)
- ``setup_finished``    {script, exit_code, duration, timed_out}  (environment's, then the repository's)
- ``assistant_text``    {text}
- ``tool_started``      {call_id, name, arguments}
- ``tool_finished``     {call_id, name, ok, output, truncated, artifact_id?, interrupted?}  (``interrupted``:
                         closed by the attempt that resumed the run; its worker was lost mid-call)
- ``todo``              {todos: [{content, status}]}
- ``progress``          {message}
- ``usage``             {input_tokens, output_tokens, cached_tokens, cost_usd, model}
- ``llm_error``         {error, attempt, will_retry}
- ``artifact_created``  {artifact_id, kind, name, size}
- ``run_completed``     {run_id, summary}
- ``run_failed``        {run_id, error}
- ``run_requeued``      {run_id, lost_worker, attempt}  (``attempt``: the one that will resume it)
- ``run_resumed``       {run_id, attempt, from_step, sandbox ("reconnected" or "recreated"),
                         restored_artifact_id}  (a recovered attempt goes on from its checkpoint)
- ``workspace_restored`` {artifact_id, changed, deleted}  (a new sandbox got the session's saved work)
- ``context_compacted`` {elided, chars_before, chars_after}  (old output hidden from the model)
- ``title``             {title, model}  (named by the summary model after the first run)
- ``mcp_unavailable``   {server, error}  (an MCP server left out of a run: sessions/agent/mcp.py)
- ``branch_pushed``     {branch, commit}  (publish step of a GitHub session: integrations/github/publish.py)
- ``pull_request``      {url, number, branch}  (opened, or its body updated, after a push)
- ``callback_sent``     {delivery_id, kind, target, attempt, status_code}  (integrations/deliveries)
- ``callback_failed``   {delivery_id, kind, target, attempt, status_code, error, will_retry, retry_in}
  (``target`` without credentials or query string; one per failed attempt)
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DataError, IntegrityError, connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.base import ModelState

from sessions.columns import default_connection, prepared_cursor
from sessions.models import Event, Session

log = logging.getLogger(__name__)

# Called after commit with the stored events; the websocket layer registers itself here.
_listeners: list[Callable[[list[Event]], None]] = []


def add_listener(listener: Callable[[list[Event]], None]) -> None:
    if listener not in _listeners:
        _listeners.append(listener)


def _reserve(session_id: int, count: int) -> int:
    """Bump last_seq by ``count`` and return the new value (the last reserved seq)."""
    table = Session._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET last_seq = last_seq + %s WHERE id = %s RETURNING last_seq",
            [count, session_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise Session.DoesNotExist(f"session {session_id} does not exist")
    return int(row[0])


def emit(
    session_id: int, type: str, payload: dict[str, Any] | None = None, run_id: int | None = None
) -> Event:
    return emit_many(session_id, [(type, payload or {})], run_id=run_id)[0]


def emit_many(
    session_id: int, items: Iterable[tuple[str, dict[str, Any]]], run_id: int | None = None
) -> list[Event]:
    """Store the events (durably, when not inside a transaction) and return them, seqs filled in.

    On Postgres outside a transaction, concurrent calls from threads of one process share one
    statement and one commit (``_GroupCommit``); inside a transaction the events commit or roll back
    with it. Either way the websocket notification is part of the same statement (``pg_notify`` is
    delivered at commit, and never for a rollback).
    """
    items = list(items)
    if not items:
        return []
    conn = default_connection()  # looked up once: each ``connection.x`` costs a lookup
    if conn.vendor == "postgresql":
        request = _Request(session_id, run_id, items)
        if not conn.in_atomic_block and settings.EVENTS_GROUP_COMMIT:
            events = _group_commit().submit(request, conn)
            # Committed already: call the listeners here rather than through on_commit, which
            # would take a (pooled) connection just to learn that we are in autocommit.
            if _listeners:
                _notify(events)
            return events
        _insert_postgres([request])
        events = request.result()
    else:
        with transaction.atomic():
            last = _reserve(session_id, len(items))
            first = last - len(items) + 1
            events = [
                Event(session_id=session_id, run_id=run_id, seq=first + i, type=t, payload=p)
                for i, (t, p) in enumerate(items)
            ]
            Event.objects.bulk_create(events)
    if _listeners:
        transaction.on_commit(lambda: _notify(events))  # runs at once outside an atomic block
    return events


def emit_many_with(
    session_id: int,
    items: list[tuple[str, dict[str, Any]]],
    run_id: int | None,
    sql: str,
    params: dict,
    *,
    session_set: str = "",
    before: str = "",
) -> tuple[list[Event], dict | None]:
    """Postgres: emit_many's statement with ``sql``, the caller's own ``UPDATE ... RETURNING`` of
    rows other than the session's (a run's heartbeat, say), in it: one round trip and, outside a
    transaction, one commit for both. ``sql`` holds ``{locked}`` where its WHERE clause takes a
    condition that makes it wait for the session's row lock, so it locks in the order of emitting
    first and updating then; ``params`` are the (named) parameters of it and of the other two:
    ``session_set``, more ``column = t.column ...`` assignments for the session's row (its own
    UPDATE in the events' statement: Postgres updates a row once per statement), and ``before``,
    more data-modifying CTEs ("name AS (INSERT ...), "). Returns the events and the first row
    ``sql`` returned, as a dict (None for no row)."""
    assert items, "the statement's result comes with the events' rows"
    request = _Request(session_id, run_id, list(items))
    also = (sql.replace("{locked}", "EXISTS (SELECT FROM s)"), params, session_set, before)
    row = _insert_postgres([request], also)
    events = request.result()
    if _listeners:
        transaction.on_commit(lambda: _notify(events))  # runs at once outside an atomic block
    return events, row


# --- Postgres: one statement for any number of emits ------------------------------------------------


@dataclass(slots=True)
class _Request:
    """One emit_many() call: its events, and (once written) the stored Events or the error."""

    session_id: int | None  # None for statement_events: its statement names the session
    run_id: int | None
    items: list[tuple[str, dict[str, Any]]]
    # What timezone.now() returns with USE_TZ (always on here), without its read of the lazy settings.
    created: datetime = field(default_factory=partial(datetime.now, UTC))
    events: list[Event] | None = None
    error: BaseException | None = None

    def result(self) -> list[Event]:
        if self.error is not None:
            raise self.error
        assert self.events is not None
        return self.events


_new_event = Event.__new__


def _stored(
    pk: int, session_id: int, seq: int, run_id: int | None, type: str, payload: Any, created
) -> Event:
    """The Event of a row just written, as a query would load it, without ``Model.__init__``: that
    was about a quarter of an emit's CPU with group commit (it handles arguments, defaults and
    descriptors the stored row does not need). A test checks it sets what ``Event(...)`` sets."""
    event = _new_event(Event)
    state = event._state = ModelState()
    state.adding, state.db = False, DEFAULT_DB_ALIAS
    event.__dict__.update(
        id=pk, session_id=session_id, seq=seq, run_id=run_id, type=type, payload=payload, created=created
    )
    return event


# One JSON document carries the events: [{"s": session_id, "r": run_id, "t": type, "p": payload,
# "c": created, "n": noted}, ...], read by json_to_recordset in one pass (json_array_elements and
# ``e->>0``... parsed each event's JSON again for every field: ~25% more of Postgres's CPU per event;
# ``p`` stays json, its text as the emitter wrote it, for the notification).
# The sessions' ids come again as an array, for their rows to be found through the primary key: from
# ``c`` alone, json_to_recordset's fixed estimate (100 rows) made the generic plan scan the whole
# session table, twice, for every statement (a lone emit too): ~1.5 of ~9 ms of a 45-event statement
# with 2,700 sessions, and growing with the table until the plan flips.
# Sessions are locked in id order (``l``) so that two multi-session statements cannot deadlock; each
# session's last_seq moves by its number of events and the rows take the numbers in between, in the
# order they were given. The notification (one per session, in notify.encode's format, built here
# because only the statement knows the seqs; ``e`` only when ``noted``, i.e. when it fits) is
# delivered at commit, so it never announces a row a reader cannot see, and costs no round trip.
# It is one aggregate over ``k``: joined back to ``s`` instead, the generic plan (rows=1 everywhere)
# nests the aggregate inside a loop over the sessions and builds every session's JSON once per
# session in the batch, quadratic in a batch of many sessions.
# (Measured, and left out: sending it in a second transaction of its own after the commit, so that
# commits need not hold Postgres's notification queue lock through their WAL flush. It helps only
# many small concurrent commits (EVENTS_GROUP_COMMIT off: ~1,150 -> ~2,000 events/s for 100
# emitters); with group commit, in one process or four, the extra round trip per batch cost more
# (~+20 us of client CPU per event) than the lock did, and a lone emitter lost a third.)
_PG_INSERT = """
WITH i AS (
    SELECT s AS session_id, r AS run_id, t AS type, p AS payload, c AS created, n AS noted, ord
    FROM ROWS FROM (
        json_to_recordset(%(events)s::json) AS (s bigint, r bigint, t text, p json, c text, n boolean)
    ) WITH ORDINALITY AS x(s, r, t, p, c, n, ord)
),
c AS (SELECT session_id, count(*) AS n FROM i GROUP BY session_id),
l AS (SELECT id FROM {session} WHERE id = ANY(%(sessions)s::bigint[]) ORDER BY id FOR NO KEY UPDATE),
s AS (
    UPDATE {session} t SET last_seq = t.last_seq + c.n FROM c, l
    WHERE t.id = ANY(%(sessions)s::bigint[]) AND t.id = c.session_id AND l.id = t.id
    RETURNING t.id, t.last_seq, c.n
),
k AS (
    SELECT i.*, s.last_seq, s.n,
           s.last_seq - s.n + row_number() OVER (PARTITION BY i.session_id ORDER BY i.ord) AS seq
    FROM i JOIN s ON s.id = i.session_id
),
ins AS (
    INSERT INTO {event} (session_id, run_id, seq, type, payload, created)
    SELECT session_id, run_id, seq, type, payload::jsonb, created::timestamptz FROM k ORDER BY ord
    RETURNING id, session_id, seq
),
nt AS (
    SELECT pg_notify(%(channel)s, json_build_object(
        's', session_id, 'm', max(last_seq), 'n', max(n),
        'e', CASE WHEN bool_and(noted) THEN json_agg(json_build_object(
            'seq', seq, 'type', type, 'payload', payload, 'created', created, 'run', run_id
        ) ORDER BY seq) END
    )::text)
    FROM k WHERE %(notify)s GROUP BY session_id
)
SELECT id, session_id, seq FROM ins WHERE (SELECT count(*) FROM nt) >= 0
"""
_PG_SQL = _PG_INSERT.format(session=Session._meta.db_table, event=Event._meta.db_table)
# With another statement (emit_many_with): its first row comes back with each event's.
_PG_WITH = _PG_SQL.replace(
    "\nSELECT id, session_id, seq FROM ins",
    ",\n{before}x AS ({also})\nSELECT id, session_id, seq, (SELECT to_jsonb(x) FROM x LIMIT 1) FROM ins",
).replace("SET last_seq = t.last_seq + c.n FROM", "SET last_seq = t.last_seq + c.n{session_set} FROM")
assert _PG_WITH.count("{") == 3, "the statement's own braces would be taken for placeholders"
# The events' CTEs (i ... nt) for a statement of another module to run in its own WITH list, after
# CTEs of its own that decide whether and for which session the events are written: ``{gate}``
# (a condition: no event row without it), ``{session}`` (the session's id), ``{payload}`` (an
# expression over the document's ``t`` and ``p``: a payload only that statement knows) and
# ``{session_set}`` (as emit_many_with's). ``s`` returns the session's status after the update; the
# statement must read ``nt`` (SELECT CTEs run only when read) and ``ins`` (its rows: id, seq).
_PG_CTES = (
    _PG_SQL.strip()
    .removeprefix("WITH ")
    .split("\nSELECT id, session_id, seq FROM ins")[0]
    .replace("AS x(s, r, t, p, c, n, ord)\n", "AS x(s, r, t, p, c, n, ord)\n    WHERE {gate}\n")
    .replace("SELECT s AS session_id, r AS run_id, t AS type, p AS payload",
             "SELECT {session} AS session_id, r AS run_id, t AS type, {payload} AS payload")
    .replace("%(sessions)s::bigint[]", "ARRAY[{session}]::bigint[]")
    .replace("SET last_seq = t.last_seq + c.n FROM", "SET last_seq = t.last_seq + c.n{session_set} FROM")
    .replace("RETURNING t.id, t.last_seq, c.n", "RETURNING t.id, t.last_seq, c.n, t.status")
)  # fmt: skip
assert _PG_CTES.count("{") == 6 and "%(sessions)s" not in _PG_CTES, "a replacement above missed"


def statement_events(
    run_id: int, items: list[tuple[str, dict[str, Any]]]
) -> tuple[dict[str, Any], Callable[[int, list[tuple[str, dict[str, Any]]], Any], list[Event]]]:
    """For a statement with ``_PG_CTES`` (Postgres): its parameters for the events ``items`` of
    ``run_id``, and what turns the rows the statement inserted (its session, the items as written,
    the ``[[id, seq], ...]`` of ``ins``) into the stored Events, their listeners called at commit."""
    from sessions.streaming.notify import PG_CHANNEL

    request = _Request(None, run_id, items)  # the statement names the session ({session})
    created = request.created
    document, _ = _document([request])
    params = {"events": document, "channel": PG_CHANNEL, "notify": settings.STREAM_BACKEND == "postgres"}

    def stored(session_id: int, written: list[tuple[str, dict[str, Any]]], rows: Any) -> list[Event]:
        if isinstance(rows, str):
            rows = json.loads(rows)
        seq_of = sorted((seq, pk) for pk, seq in rows)
        events = [
            _stored(pk, session_id, seq, run_id, t, p, created)
            for (seq, pk), (t, p) in zip(seq_of, written, strict=True)
        ]
        if _listeners:
            transaction.on_commit(lambda: _notify(events))
        return events

    return params, stored


# Room for the envelope and the seqs and keys a notification adds to the events' own JSON (less the
# 20 bytes of an event's five keys in the statement's document).
_NOTE_OVERHEAD, _NOTE_PER_EVENT = 80, 48 - len('"s":"r":"t":"p":"c":')


def _document(requests: list[_Request]) -> tuple[str, list[int | None]]:
    """The events statement's document (see ``_PG_SQL``) for ``requests``, and their sessions.

    Each event says whether its notification carries it (``n``): all of a session's do, unless
    together they would not fit in one notification."""
    from sessions.streaming.notify import LIMITS
    from sessions.streaming.store import dumps, iso

    sizes: dict[int | None, int] = defaultdict(lambda: _NOTE_OVERHEAD)
    rows: list[tuple[int | None, list[str]]] = []
    for r in requests:
        created = iso(r.created)
        texts = [dumps({"s": r.session_id, "r": r.run_id, "t": t, "p": p, "c": created}) for t, p in r.items]
        sizes[r.session_id] += sum(len(text.encode()) + _NOTE_PER_EVENT for text in texts)
        rows.append((r.session_id, texts))
    limit = LIMITS["postgres"]
    # Each item's JSON object ends with "}": append the "noted" flag before it.
    flags = {sid: ',"n":true}' if size <= limit else ',"n":false}' for sid, size in sizes.items()}
    document = "[" + ",".join(text[:-1] + flags[sid] for sid, texts in rows for text in texts) + "]"
    return document, list(sizes)


def _insert_postgres(requests: list[_Request], also: tuple[str, dict, str, str] | None = None) -> dict | None:
    """Reserve the numbers, insert the rows and notify, in one statement: one round trip.

    In autocommit the statement is its own transaction; inside an outer atomic block it commits
    (or rolls back, numbers and notification included) with it, so seqs stay gap-free either way.
    Fills in each request's events, or its error (a session that does not exist). ``also``: another
    statement, its parameters, the session's other assignments and the CTEs before it, run by
    this one (emit_many_with); its first row is returned.
    """
    from sessions.streaming.notify import PG_CHANNEL

    notify = settings.STREAM_BACKEND == "postgres"
    document, sessions = _document(requests)
    sessions = "{" + ",".join(map(str, sessions)) + "}"
    params = {"events": document, "sessions": sessions, "channel": PG_CHANNEL, "notify": notify}
    sql = _PG_SQL
    if also is not None:
        statement, more, session_set, before = also
        sql = (
            _PG_WITH.replace("{session_set}", session_set)
            .replace("{before}", before)
            .replace("{also}", statement)
        )
        params |= more
    with prepared_cursor() as cursor:
        cursor.execute(sql, params)
        returned = cursor.fetchall()
    ids: dict[int, dict[int, int]] = defaultdict(dict)
    for pk, session_id, seq, *_ in returned:
        ids[session_id][seq] = pk
    taken: dict[int, int] = {sid: min(seqs) for sid, seqs in ids.items()}
    for r in requests:
        if r.session_id not in taken:
            r.error = Session.DoesNotExist(f"session {r.session_id} does not exist")
            continue
        first = taken[r.session_id]
        taken[r.session_id] = first + len(r.items)
        pks = ids[r.session_id]
        r.events = [
            _stored(pks[first + i], r.session_id, first + i, r.run_id, t, p, r.created)
            for i, (t, p) in enumerate(r.items)
        ]
    if also is None or not returned or returned[0][3] is None:
        return None
    row = returned[0][3]
    return json.loads(row) if isinstance(row, str) else row


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


class _Batch(list):
    """The requests one statement writes, the first of them writing. Locks, held until released:
    ``turn`` when the write before is done and the first may start, ``done`` when this one is.
    Bare locks are the cheapest wake-up there is (threading.Event adds a Condition and a lock per
    wait). The writer releases ``done`` once and every waiter passes it on as it wakes: the writer
    woke each of ~50 waiters itself before, and was preempted by nearly every one of them (~40% of
    the process's CPU per event went to that hand-off)."""

    __slots__ = ("turn", "done")

    def __init__(self, *requests: _Request) -> None:
        super().__init__(requests)
        self.turn, self.done = _held_lock(), _held_lock()


class _GroupCommit:
    """Concurrent emit() calls of one process share a statement and a commit.

    The first caller to arrive while nothing is being written writes its own events at once (so a
    lone emitter waits for nothing extra); whoever arrives during that write queues, and when it
    completes the oldest queued caller writes everything queued, on its own connection. Every
    caller returns only once its rows are committed, or with the error that stopped them. A failed
    batch is retried one request at a time, so one bad event (an unknown session or run) fails
    only its own emit().
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue = _Batch()  # the next statement's requests
        self.writing = False
        self.batches = 0  # statements executed (for tests and the bench)

    def submit(self, request: _Request, conn: BaseDatabaseWrapper) -> list[Event]:
        with self.lock:
            lead = not self.writing
            if lead:
                self.writing = True
                batch: list[_Request] = [request]  # nobody waits for it: no locks
            else:
                batch = self.queue
                batch.append(request)
        if not lead:
            head = batch[0] is request
            self._before_waiting(conn, head)
            if not head:
                with batch.done:  # released when written; releasing it is the next waiter's wake-up
                    pass  # (``with``: even a signal's exception right after the wake passes it on)
                return request.result()
            batch.turn.acquire()  # hand_over took the batch out of the queue: it is complete
        try:
            self._write(batch)
        finally:
            with self.lock:
                self.batches += 1
                self.hand_over()
            if isinstance(batch, _Batch):
                batch.done.release()
        return request.result()

    def hand_over(self) -> None:
        """A write is done (call with the lock held): the oldest queued caller writes next."""
        if self.queue:
            self.queue.turn.release()
            self.queue = _Batch()
        else:
            self.writing = False

    @staticmethod
    def _before_waiting(conn: BaseDatabaseWrapper, head: bool) -> None:
        """The first caller in the queue writes next: it holds (or takes, while the current write
        runs) a connection, so the batch starts the moment it is woken rather than after a pool
        check-out. Everyone else waits without one: the next writer may need a pooled connection,
        and must not wait for the pool while they all sit with threads that wait for the writer."""
        if not conn.settings_dict.get("OPTIONS", {}).get("pool"):
            return
        if not head:
            if conn.connection is not None:
                conn.close()
            return
        try:
            conn.ensure_connection()
        except Exception:  # noqa: BLE001 - the write will try again and report what fails
            conn.close()

    def _write(self, batch: list[_Request]) -> None:
        try:
            _insert_postgres(batch)
            return
        except (IntegrityError, DataError) as exc:
            # The server refused the statement, so nothing of it was committed: find the request
            # that spoiled it (an unknown run, a payload jsonb cannot store) and write the others.
            if len(batch) == 1:
                batch[0].error = exc
                return
            failure = exc
        except BaseException as exc:  # noqa: BLE001 - every caller gets an answer
            # A lost connection may have lost only the reply to a commit: no retry, which could
            # store the events twice. The callers see the error, as with any failed write.
            for request in batch:
                request.error = exc
            return
        log.info("a batch of %s emits failed (%s); writing them one by one", len(batch), failure)
        for request in batch:  # find the one that spoiled the batch; the others still get written
            request.events = request.error = None
            try:
                _insert_postgres([request])
            except BaseException as exc:  # noqa: BLE001
                request.error = exc


_group: _GroupCommit | None = None


def _forget_group() -> None:
    global _group
    _group = None


os.register_at_fork(after_in_child=_forget_group)  # a fork, like a qcluster worker, gets its own


def _group_commit() -> _GroupCommit:
    """One per process."""
    global _group
    if _group is None:
        _group = _GroupCommit()
    return _group


def _notify(events: list[Event]) -> None:
    for listener in list(_listeners):
        listener(events)


def _push_to_websockets(events: list[Event]) -> None:
    if settings.STREAM_BACKEND == "postgres":
        return  # the insert statement notified (see _PG_INSERT)
    from sessions.streaming.notify import publish  # never raises: a failed push is only logged

    publish(events)


add_listener(_push_to_websockets)

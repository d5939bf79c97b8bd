"""The one way events are written. The database row is the truth; pushes are notifications.

Sequence numbers come from ``Session.last_seq`` bumped with ``UPDATE ... RETURNING`` inside the same
transaction as the insert, so they are gap-free: a rolled-back emit rolls back its number too.

Event types and their payloads (all JSON objects):

- ``status``            {status}
- ``message``           {message_id, content, position}
- ``run_started``       {run_id, attempt}
- ``sandbox_ready``     {sandbox_id, provider, isolated, reason?}
- ``repository_ready``  {url, base_branch, branch, commit}
- ``setup_output``      {stream, text}  (``.deputies/setup`` output, coalesced)
- ``setup_finished``    {exit_code, duration, timed_out}
- ``assistant_text``    {text}
- ``tool_started``      {call_id, name, arguments}
- ``tool_finished``     {call_id, name, ok, output, truncated, artifact_id?}
- ``todo``              {todos: [{content, status}]}
- ``progress``          {message}
- ``usage``             {input_tokens, output_tokens, cached_tokens, cost_usd, model}
- ``llm_error``         {error, attempt, will_retry}
- ``artifact_created``  {artifact_id, kind, name, size}
- ``run_completed``     {run_id, summary}
- ``run_failed``        {run_id, error}
- ``run_requeued``      {run_id, lost_worker}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from sessions.models import Event, Session

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
    items = list(items)
    if not items:
        return []
    if connection.vendor == "postgresql":
        events = _insert_postgres(session_id, items, run_id)
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


_PG_INSERT = """
WITH s AS (UPDATE {session} SET last_seq = last_seq + %(n)s WHERE id = %(session_id)s RETURNING last_seq)
INSERT INTO {event} (session_id, run_id, seq, type, payload, created)
SELECT %(session_id)s, %(run_id)s, s.last_seq - %(n)s + i.ord, i.type, i.payload::jsonb, %(created)s
FROM s, unnest(%(types)s::text[], %(payloads)s::text[]) WITH ORDINALITY AS i(type, payload, ord)
RETURNING id, seq
"""


def _insert_postgres(
    session_id: int, items: list[tuple[str, dict[str, Any]]], run_id: int | None
) -> list[Event]:
    """Reserve the numbers and insert the rows in one statement: one round trip per emit.

    In autocommit the statement is its own transaction; inside an outer atomic block it commits
    (or rolls back, numbers included) with it, so seqs stay gap-free either way.
    """
    created = timezone.now()
    sql = _PG_INSERT.format(session=Session._meta.db_table, event=Event._meta.db_table)
    params = {
        "n": len(items),
        "session_id": session_id,
        "run_id": run_id,
        "created": created,
        "types": [t for t, _ in items],
        "payloads": [json.dumps(p, cls=DjangoJSONEncoder) for _, p in items],
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        ids = dict((seq, pk) for pk, seq in cursor.fetchall())
    if not ids:
        raise Session.DoesNotExist(f"session {session_id} does not exist")
    first = min(ids)
    return [
        Event(
            id=ids[first + i],
            session_id=session_id,
            run_id=run_id,
            seq=first + i,
            type=t,
            payload=p,
            created=created,
        )
        for i, (t, p) in enumerate(items)
    ]


def _notify(events: list[Event]) -> None:
    for listener in list(_listeners):
        listener(events)


def _push_to_websockets(events: list[Event]) -> None:
    from sessions.streaming.notify import publish  # never raises: a failed push is only logged

    publish(events)


add_listener(_push_to_websockets)

"""What the websockets send, read from the rows (the truth) and encoded once per process.

Frames built from a notification and frames built from the database carry the same JSON (payloads
are encoded like emit() stores them; only jsonb's key order may differ), so a client cannot tell a
replayed event from a pushed one. All functions here are synchronous (ORM).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, TypedDict

from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import OuterRef, Subquery

from sessions.api.permissions import readable_teams
from sessions.models import Event, Session

# Event types that change what the session list shows.
LIST_TYPES = ("status", "usage")
PAGE = 500


class EventData(TypedDict):
    seq: int
    type: str
    payload: dict[str, Any]
    created: str
    run: int | None


class SessionData(TypedDict):
    id: int
    status: str
    title: str
    updated: str
    cost_usd: str
    input_tokens: int
    output_tokens: int


def iso(value: datetime) -> str:
    """ISO 8601 as the REST API writes it (DRF turns ``+00:00`` into ``Z``)."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def event_data(event: Event) -> EventData:
    return {
        "seq": event.seq,
        "type": event.type,
        "payload": event.payload,
        "created": iso(event.created),
        "run": event.run_id,
    }


# What json.dumps(value, cls=DjangoJSONEncoder, ...) does, but built once: dumps with ``cls`` makes
# an encoder per call, half the cost of encoding an event (the encoder keeps no state between calls).
dumps = DjangoJSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def event_frame(data: EventData) -> str:
    return dumps({"type": "event", "event": data})


def session_frame(data: SessionData) -> str:
    return dumps({"type": "session", "session": data})


def read_event_frames(
    session_id: int, after: int, upto: int | None = None, limit: int = PAGE
) -> list[tuple[int, str]]:
    """Stored events with ``after < seq <= upto`` in order, as (seq, frame)."""
    rows = Event.objects.filter(session_id=session_id, seq__gt=after)
    if upto is not None:
        rows = rows.filter(seq__lte=upto)
    return [(e.seq, event_frame(event_data(e))) for e in rows.order_by("seq")[:limit]]


def last_seqs(session_ids: Iterable[int]) -> dict[int, int]:
    return dict(Session.objects.filter(pk__in=list(session_ids)).values_list("pk", "last_seq"))


def can_read_session(user, session_id: int | None) -> bool:
    """Members of the session's team and staff; anyone else cannot tell it from a missing one."""
    if session_id is None:
        return False
    return Session.objects.filter(pk=session_id, team__in=readable_teams(user)).exists()


def readable_team_ids(user) -> frozenset[int] | None:
    """``None`` means every team (staff)."""
    if user.is_staff:
        return None
    return frozenset(readable_teams(user).values_list("pk", flat=True))


def session_rows(session_ids: Iterable[int]) -> list[tuple[int, SessionData]]:
    """(team_id, list entry) for each session. ``updated`` is the newest of the row's own timestamp
    and its last event: status and usage change through ``update()``, which leaves ``updated`` alone."""
    last_event = Event.objects.filter(session_id=OuterRef("pk"), seq=OuterRef("last_seq")).values("created")
    rows = Session.objects.filter(pk__in=list(session_ids)).annotate(last_event=Subquery(last_event[:1]))
    result = []
    for s in rows.order_by("pk"):
        updated = max(s.updated, s.last_event) if s.last_event else s.updated
        result.append(
            (
                s.team_id,
                {
                    "id": s.pk,
                    "status": s.status,
                    "title": s.title,
                    "updated": iso(updated),
                    "cost_usd": str(s.cost_usd),
                    "input_tokens": s.input_tokens,
                    "output_tokens": s.output_tokens,
                },
            )
        )
    return result


def sessions_with_list_events(after_event_id: int, limit: int = 1000) -> tuple[int, set[int]]:
    """Poll mode only (SQLite writes one transaction at a time, so ids grow in commit order): the
    sessions with a status or usage event past ``after_event_id``, and the new cursor."""
    rows = list(
        Event.objects.filter(pk__gt=after_event_id)
        .order_by("pk")
        .values_list("pk", "session_id", "type")[:limit]
    )
    if not rows:
        return after_event_id, set()
    return rows[-1][0], {sid for _, sid, t in rows if t in LIST_TYPES}


def sessions_with_list_events_since(since: datetime) -> set[int]:
    """After a lost listener connection: which sessions may have changed while nobody was listening."""
    return set(
        Event.objects.filter(created__gte=since, type__in=LIST_TYPES)
        .order_by()
        .values_list("session_id", flat=True)
        .distinct()
    )


def max_event_id() -> int:
    last = Event.objects.order_by("-pk").values_list("pk", flat=True).first()
    return last or 0

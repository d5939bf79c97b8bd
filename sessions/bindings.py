"""The one way an external thread reaches a session: the first message in a thread starts a session
and binds the thread to it; every later message in that thread is a follow-up of that session.

Webhooks use it now; Slack threads and GitHub issues/PRs use the same function with their own key
(see ``SessionBinding``). Race-safe on Postgres: two first messages of one thread arriving at once
both try to insert the binding; the unique constraint makes the second wait for the first to commit
and then fail, and the loser rolls back its new session (and its queued run, which is inserted in
the same transaction or only queued at commit) and becomes a follow-up of the winner's session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction

from sessions.models import Message, Session, SessionBinding, SessionStatus, Team, start_session


class BindingError(ValueError):
    """The thread is bound to a session of another team (a key collision between integrations)."""


@dataclass
class Routed:
    session: Session
    created: bool  # True: a new session was started (and bound); False: a follow-up was added
    message: Message | None = None  # the follow-up, when one was added


def start_or_follow_up(
    *,
    team: Team,
    source: str,
    key: str,
    prompt: str,
    thread: str = "",
    author=None,
    external_ref: dict[str, Any] | None = None,
    **start: Any,
) -> Routed:
    """Add ``prompt`` to the session bound to ``(source, key)``, or start one and bind it.

    ``start`` is what ``start_session`` needs for a new session (repository, model, environment,
    title, base_branch, budget_usd, created_by); it is unused for a follow-up. ``thread`` is the
    thread as people read it ("ci-bot, thread 42"), kept in the session's ``external_ref`` with the
    key. A thread whose session was archived starts a new session and is bound to it instead.
    The caller may hold a transaction; this one nests in it.
    """
    ref = {**(external_ref or {}), "binding": key, "thread": thread or key}
    with transaction.atomic():
        binding = _locked(source, key)
        if binding is None:
            try:
                with transaction.atomic():  # a savepoint: losing the race undoes only this
                    session = start_session(
                        team=team, source=source, external_ref=ref, prompt=prompt, **start
                    )
                    SessionBinding.objects.create(team=team, source=source, key=key, session=session)
                return Routed(session, created=True)
            except IntegrityError:
                binding = _locked(source, key)
                if binding is None:  # not the binding's constraint that failed
                    raise
        if binding.team_id != team.pk:
            raise BindingError(f"{key!r} is bound to a session of another team.")
        session = binding.session
        if session.status == SessionStatus.ARCHIVED:
            session = start_session(team=team, source=source, external_ref=ref, prompt=prompt, **start)
            SessionBinding.objects.filter(pk=binding.pk).update(session=session)
            return Routed(session, created=True)
        message = session.add_message(prompt, author=author)
        return Routed(session, created=False, message=message)


def _locked(source: str, key: str) -> SessionBinding | None:
    """The binding, locked until the caller's transaction ends, so follow-ups of one thread and the
    rebinding of an archived one happen one at a time."""
    return (
        SessionBinding.objects.select_for_update(of=("self",))
        .select_related("session")
        .filter(source=source, key=key)
        .first()
    )

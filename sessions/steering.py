"""Steering a running agent, and changing follow-ups before a run picks them.

A follow-up sent with ``steer`` while a run is active is not left for the next run: the running agent
gets it as a user message before its next model call. How the loop learns of one without a query per
step: ``Session.add_message`` bumps the active run's ``steers`` counter and the heartbeat statement
(``Run.beat``, once per step) reads it back. Only when the counter moved does the loop claim the
session's pending steer messages (``take_steers``), with a conditional update, so a steer message is
delivered exactly once: to this run, or, when the run ended first, to the next run, which claims every
pending message as usual.

Pending follow-ups (plain or steer) may be edited or cancelled until a run claims them; both are
conditional updates on ``status = pending``, so they lose cleanly against a claim.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from sessions.events import emit, emit_many
from sessions.models import Message, Run, Session, SessionStatus


def take_steers(run: Run, transcript: list[dict[str, Any]]) -> list[Message]:
    """Claim the session's pending steer messages for ``run`` and append them to ``transcript``.

    One ``message_injected`` event per message marks it delivered (the timeline shows it).
    """
    with transaction.atomic():
        taken = list(
            Message.objects.select_for_update(skip_locked=True)
            .filter(session_id=run.session_id, status=Message.Status.PENDING, steer=True)
            .order_by("position")
        )
        if not taken:
            return []
        Message.objects.filter(pk__in=[m.pk for m in taken], status=Message.Status.PENDING).update(
            status=Message.Status.CLAIMED, run=run
        )
        emit_many(
            run.session_id,
            [
                (
                    "message_injected",
                    {"message_id": m.pk, "position": m.position, "run_id": run.pk, "step": run.steps},
                )
                for m in taken
            ],
            run_id=run.pk,
        )
    for message in taken:
        transcript.append({"role": "user", "content": message.content})
    return taken


def edit_pending(message: Message, content: str) -> bool:
    with transaction.atomic():
        if not Message.objects.filter(pk=message.pk, status=Message.Status.PENDING).update(content=content):
            message.refresh_from_db()
            return False
        emit(message.session_id, "message_edited", {"message_id": message.pk, "content": content})
    message.content = content
    return True


def cancel_pending(message: Message) -> bool:
    """Withdraw a pending follow-up. When it was all a still-queued follow-up run had to do, that run
    is cancelled too (it would otherwise start with nothing new to say) and the session goes back to
    how its last run left it."""
    with transaction.atomic():
        session = Session.objects.select_for_update(no_key=True).get(pk=message.session_id)
        if not Message.objects.filter(pk=message.pk, status=Message.Status.PENDING).update(
            status=Message.Status.CANCELLED
        ):
            message.refresh_from_db()
            return False
        emit(session.pk, "message_cancelled", {"message_id": message.pk, "position": message.position})
        if not session.messages.filter(status=Message.Status.PENDING).exists():
            queued = session.runs.filter(status=Run.Status.QUEUED).first()
            if queued is not None and queued.attempt > 1:
                now = timezone.now()
                if Run.objects.filter(pk=queued.pk, status=Run.Status.QUEUED).update(
                    status=Run.Status.CANCELLED, finished=now, error="its follow-ups were cancelled"
                ):
                    last = session.runs.exclude(pk=queued.pk).order_by("-created", "-pk").first()
                    previous = {
                        Run.Status.COMPLETED: SessionStatus.COMPLETED,
                        Run.Status.FAILED: SessionStatus.FAILED,
                    }.get(last.status if last else None, SessionStatus.CANCELLED)
                    Session.objects.filter(pk=session.pk).update(status=previous, finished=now)
                    emit(session.pk, "status", {"status": previous})
    message.status = Message.Status.CANCELLED
    return True

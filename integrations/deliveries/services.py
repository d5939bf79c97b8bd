"""The delivery pipeline: enqueue, claim, one attempt through the kind's sender, record, retry.

Public interface (what integrations call):

* ``enqueue(*, session, kind, target, payload, idempotency_key, event="", run=None,
  subscription=None, max_attempts=None) -> Delivery``: inside the caller's transaction; the send is
  queued with it (one commit on Postgres, else at commit) and happens on a worker, never in a request.
  The same ``(kind, idempotency_key)`` again returns the first delivery.
* ``subscribe(session, url, secret, *, label="") -> CallbackSubscription``: an HTTP endpoint that
  gets a signed callback whenever one of the session's runs ends. Validate the URL first
  (``deputies.netguard.check_url``); it is checked again on the address connected to, at send time.
  Subscribing the same URL again updates its secret and label.
* ``wake(queryset) -> ids``: pending deliveries that waited for something (Slack: the thread's first
  message) become due now. ``session`` may be None for an answer that belongs to no session.
* ``replay(delivery) -> Delivery``: a new delivery with the same payload and idempotency key.

Sending: ``send(delivery_id)`` (the queue task) claims a due pending row with a conditional update
(``sending``, ``claimed_at`` = the lease), makes one attempt, then in one transaction writes the
attempt, the new state and the timeline event, and queues the next attempt at its due time in the
queue table (``deputies.broker.enqueue_at``: no thread sleeps). ``recover_stale()`` (every minute)
makes ``sending`` rows whose lease ran out pending again and requeues due rows whose task was lost.
At-least-once: a receiver deduplicates by the ``X-Deputies-Delivery`` header.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from integrations.deliveries.models import CallbackSubscription, Delivery, DeliveryAttempt
from integrations.deliveries.senders import Outcome, sender_for

log = logging.getLogger(__name__)

TASK = "integrations.deliveries.tasks.send_delivery"


def _queue(delivery_id: int, attempt: int, eta=None) -> None:
    """The send task for attempt number ``attempt``, part of the caller's transaction where the
    broker allows it, else at commit. The number lets a duplicate task (recovery requeues what
    may still be queued) see that its attempt was made and drop out."""
    from django_q.conf import Conf

    from deputies.broker import enqueue_at, queue_joins_transaction

    if eta is not None and Conf.SYNC:
        return  # sync mode runs tasks at once; a later attempt waits for recover_stale()
    name = f"delivery-{delivery_id}"
    if eta is None:
        from django_q.tasks import async_task

        def push() -> None:
            async_task(TASK, delivery_id, attempt, task_name=name, group="deliveries")
    else:

        def push() -> None:
            enqueue_at(eta, TASK, delivery_id, attempt, task_name=name, group="deliveries")

    if queue_joins_transaction():
        push()
    else:
        transaction.on_commit(push)


def enqueue(
    *,
    session,
    kind: str,
    target: str,
    payload: dict,
    idempotency_key: str,
    event: str = "",
    run=None,
    subscription: CallbackSubscription | None = None,
    max_attempts: int | None = None,
) -> Delivery:
    sender_for(kind)  # an unknown kind fails here, in the caller, not later on a worker
    if kind == Delivery.Kind.HTTP and subscription is None:
        raise ValueError("an http delivery needs its subscription (the secret it is signed with)")
    now = timezone.now()
    delivery = Delivery(
        session_id=getattr(session, "pk", session),
        run_id=getattr(run, "pk", run),
        subscription=subscription,
        kind=kind,
        event=event,
        target=target,
        payload=payload,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts or settings.DELIVERY_MAX_ATTEMPTS,
        next_attempt=now,
        created=now,
    )
    if not _insert(delivery):  # the key was used already (or concurrently): that one stands
        return Delivery.objects.get(kind=kind, idempotency_key=idempotency_key, replay_of=None)
    _queue(delivery.pk, 1)
    return delivery


def _insert(delivery: Delivery) -> bool:
    """Insert unless an original with the same key exists; on Postgres one statement (this runs in
    the transaction that ends a run), elsewhere a savepoint around the ORM's insert."""
    from django.db import connection

    if connection.vendor != "postgresql":
        existing = Delivery.objects.filter(
            kind=delivery.kind, idempotency_key=delivery.idempotency_key, replay_of=None
        ).exists()
        if existing:
            return False
        try:
            with transaction.atomic():
                delivery.save(force_insert=True)
        except IntegrityError:
            return False
        return True
    fields = [f for f in Delivery._meta.concrete_fields if not f.primary_key]
    sql = (
        f'INSERT INTO "{Delivery._meta.db_table}" ({", ".join(connection.ops.quote_name(f.column) for f in fields)}) '
        f"VALUES ({', '.join(['%s'] * len(fields))}) "
        "ON CONFLICT (kind, idempotency_key) WHERE replay_of_id IS NULL DO NOTHING RETURNING id"
    )
    params = [f.get_db_prep_save(f.pre_save(delivery, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return False
    delivery.pk = row[0]
    delivery._state.adding, delivery._state.db = False, connection.alias
    return True


def wake(deliveries) -> list[int]:
    """Make these pending deliveries due now and queue them: what they waited for arrived (Slack:
    the thread's first message, whose ``ts`` the later messages need). Safe to repeat."""
    now = timezone.now()
    with transaction.atomic():
        ids = list(deliveries.filter(status=Delivery.Status.PENDING).values_list("pk", flat=True))
        Delivery.objects.filter(pk__in=ids, status=Delivery.Status.PENDING).update(next_attempt=now)
        for pk in ids:
            _queue(pk)
    return ids


def subscribe(session, url: str, secret: str, *, label: str = "") -> CallbackSubscription:
    if not secret:
        raise ValueError("a callback needs a signing secret")
    with transaction.atomic():
        subscription = (
            CallbackSubscription.objects.select_for_update()
            .filter(session_id=getattr(session, "pk", session), url=url)
            .first()
        )
        if subscription is None:
            subscription = CallbackSubscription(session_id=getattr(session, "pk", session), url=url)
        subscription.label = label
        subscription.active = True
        subscription.set_secret(secret)
        try:
            with transaction.atomic():
                subscription.save()
        except IntegrityError:  # subscribed concurrently: update that one
            subscription = CallbackSubscription.objects.get(session_id=subscription.session_id, url=url)
            subscription.label, subscription.active = label, True
            subscription.set_secret(secret)
            subscription.save()
    return subscription


class NotReplayable(Exception):
    """The delivery is still pending or sending."""


def replay(delivery: Delivery) -> Delivery:
    """Send an ended delivery again, as a new delivery with the same payload and idempotency key."""
    if not delivery.done:
        raise NotReplayable(f"delivery {delivery.pk} is still {delivery.status}")
    now = timezone.now()
    with transaction.atomic():
        copy = Delivery.objects.create(
            session_id=delivery.session_id,
            run_id=delivery.run_id,
            subscription_id=delivery.subscription_id,
            kind=delivery.kind,
            event=delivery.event,
            target=delivery.target,
            payload=delivery.payload,
            idempotency_key=delivery.idempotency_key,
            max_attempts=settings.DELIVERY_MAX_ATTEMPTS,
            next_attempt=now,
            created=now,
            replay_of=delivery,
        )
        _queue(copy.pk, 1)
    return copy


def backoff(attempt: int) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    ceiling = min(settings.DELIVERY_BACKOFF_MAX, settings.DELIVERY_BACKOFF_BASE * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)


_CLAIM = """
WITH c AS (
    UPDATE {delivery} SET status = %(sending)s, claimed_at = %(now)s, attempts = attempts + 1
    WHERE id = %(id)s AND status = %(pending)s AND next_attempt <= %(now)s
    RETURNING *
)
SELECT c.*, s.url AS subscription_url, s.secret_ciphertext AS subscription_secret
FROM c LEFT JOIN {subscription} s ON s.id = c.subscription_id
"""


def claim(delivery_id: int) -> Delivery | None:
    """pending and due -> sending, with a fresh lease: exactly one worker wins. On Postgres the
    claim and the read of the row and its subscription are one statement (the send path)."""
    from django.db import connection

    now = timezone.now()
    if connection.vendor == "postgresql":
        sql = _CLAIM.format(
            delivery=Delivery._meta.db_table, subscription=CallbackSubscription._meta.db_table
        )
        params = {"id": delivery_id, "now": now, "sending": Delivery.Status.SENDING,
                  "pending": Delivery.Status.PENDING}  # fmt: skip
        rows = list(Delivery.objects.raw(sql, params))
        if not rows:
            return None
        delivery = rows[0]
        subscription = None
        if delivery.subscription_id is not None and delivery.subscription_secret is not None:
            subscription = CallbackSubscription(
                id=delivery.subscription_id,
                session_id=delivery.session_id,
                url=delivery.subscription_url,
                secret_ciphertext=delivery.subscription_secret,
            )
        delivery.subscription = subscription
        return delivery
    changed = Delivery.objects.filter(
        pk=delivery_id, status=Delivery.Status.PENDING, next_attempt__lte=now
    ).update(status=Delivery.Status.SENDING, claimed_at=now, attempts=F("attempts") + 1)
    if not changed:
        return None
    return Delivery.objects.select_related("subscription").get(pk=delivery_id)


def send(delivery_id: int, attempt: int | None = None) -> str:
    """The queue task: attempt ``attempt`` of a due delivery (a duplicate or early task is harmless)."""
    delivery = claim(delivery_id)
    if delivery is None:
        row = Delivery.objects.filter(pk=delivery_id).values("status", "next_attempt", "attempts").first()
        if row is None:
            return "missing"
        if attempt is not None and row["attempts"] + 1 != attempt:
            return f"skipped: attempt {attempt} was made already"
        if row["status"] == Delivery.Status.PENDING and row["next_attempt"] > timezone.now():
            # Early (the clocks of two hosts differ): come back when due.
            _queue(delivery_id, row["attempts"] + 1, row["next_attempt"])
            return "not due yet"
        return f"skipped: delivery is {row['status']}"
    started = timezone.now()
    clock = time.monotonic()
    age = (started - delivery.created).total_seconds()
    if age > settings.DELIVERY_MAX_AGE:
        outcome = Outcome(
            ok=False, error=f"older than {settings.DELIVERY_MAX_AGE:g} s (DEPUTIES_DELIVERY_MAX_AGE)"
        )
    else:
        try:
            outcome = sender_for(delivery.kind).send(delivery, delivery.attempts)
        except Exception as exc:  # a sender bug or an undecryptable secret ends this attempt, not the worker
            log.exception("delivery %s: the %s sender failed", delivery.pk, delivery.kind)
            outcome = Outcome(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
    duration_ms = int((time.monotonic() - clock) * 1000)
    return record(delivery, outcome, started, duration_ms)


def record(delivery: Delivery, outcome: Outcome, started, duration_ms: int) -> str:
    """The attempt, the delivery's new state, its event and its next attempt: one transaction.

    Conditional on this attempt still holding the row (``sending`` with our attempt number): one that
    recovery already handed to another worker writes its log line but leaves the state alone.
    """
    from sessions.events import emit

    now = timezone.now()
    attempt = delivery.attempts
    delay: float | None = None
    if outcome.ok:
        status = Delivery.Status.DELIVERED
    elif outcome.retry and attempt < delivery.max_attempts:
        delay = outcome.retry_after if outcome.retry_after is not None else backoff(attempt)
        deadline = delivery.created + timedelta(seconds=settings.DELIVERY_MAX_AGE)
        if now + timedelta(seconds=delay) > deadline:
            delay = None
            outcome.error += "; no retry: the next one would be past DEPUTIES_DELIVERY_MAX_AGE"
        status = Delivery.Status.PENDING if delay is not None else Delivery.Status.FAILED
    else:
        status = Delivery.Status.FAILED
        if outcome.retry:
            outcome.error += f"; gave up after {attempt} attempts"
    next_attempt = now + timedelta(seconds=delay) if delay is not None else None
    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery=delivery,
            number=attempt,
            started=started,
            duration_ms=duration_ms,
            status_code=outcome.status_code,
            response_excerpt=outcome.excerpt,
            error=outcome.error[:5000],
            retry_in_seconds=delay,
        )
        changed = Delivery.objects.filter(
            pk=delivery.pk, status=Delivery.Status.SENDING, attempts=attempt
        ).update(
            status=status,
            next_attempt=next_attempt,
            claimed_at=None,
            delivered=now if outcome.ok else None,
            last_status_code=outcome.status_code,
            last_error="" if outcome.ok else outcome.error[:5000],
        )
        if not changed:
            return "superseded: recovery gave the delivery to another attempt"
        if delivery.session_id is None:  # no timeline to note it on
            if next_attempt is not None:
                _queue(delivery.pk, next_attempt)
            return status
        base = {"delivery_id": delivery.pk, "kind": delivery.kind, "target": delivery.display_target,
                "attempt": attempt, "status_code": outcome.status_code}  # fmt: skip
        if outcome.ok:
            emit(delivery.session_id, "callback_sent", base, run_id=delivery.run_id)
        else:
            emit(
                delivery.session_id,
                "callback_failed",
                {**base, "error": outcome.error[:500], "will_retry": delay is not None,
                 "retry_in": round(delay, 3) if delay is not None else None},
                run_id=delivery.run_id,
            )  # fmt: skip
        if next_attempt is not None:
            _queue(delivery.pk, attempt + 1, next_attempt)
    return status


def recover_stale(now=None) -> list[int]:
    """Sending rows whose lease ran out go back to pending; due rows get their task again.

    Both are safe to repeat: the claim is conditional, so a task queued twice sends once.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.DELIVERY_LEASE)
    requeued: list[int] = []
    with transaction.atomic():
        stale = list(
            Delivery.objects.select_for_update(skip_locked=True)
            .filter(status=Delivery.Status.SENDING, claimed_at__lt=cutoff)
            .values_list("pk", flat=True)[:1000]
        )
        if stale:
            Delivery.objects.filter(pk__in=stale, status=Delivery.Status.SENDING).update(
                status=Delivery.Status.PENDING, next_attempt=now, claimed_at=None,
                last_error="the worker sending it was lost; sending again",
            )  # fmt: skip
        # Due for longer than a lease: its queue task is gone (or very late). Queue it again.
        due = Delivery.objects.filter(status=Delivery.Status.PENDING, next_attempt__lt=cutoff)
        for pk, attempts in (due | Delivery.objects.filter(pk__in=stale)).values_list("pk", "attempts")[
            :2000
        ]:
            _queue(pk, attempts + 1)
            requeued.append(pk)
    return requeued

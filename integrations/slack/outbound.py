"""Everything Deputies says in Slack is a delivery of kind ``slack`` (integrations/deliveries): sent by
a worker with retries, ``Retry-After`` honoured, every attempt logged, nothing lost while Slack is down.

One delivery is one Web API call, named by ``payload["op"]``:

* ``post_root``: a slash command's message in the channel. Once posted, its ``ts`` is the thread:
  the thread is bound to the session (``SessionBinding``), and the eyes reaction and the status
  message are queued;
* ``post_status`` / ``update_status``: the one status message in the thread, rendered at send time
  (messages.status); edits are throttled to one per ``DEPUTIES_SLACK_STATUS_INTERVAL`` per thread
  while a run advances (``SlackThread.status_queued``), plus one when a run starts and one when it ends;
* ``react``: ``reactions.add`` / ``reactions.remove`` (eyes received, hourglass running, check or x
  at the end); "already reacted" and "no such reaction" count as done;
* ``post``: a message in the thread (the end of a run: summary, diff stats, cost, links);
* ``ephemeral``: ``chat.postEphemeral``, e.g. why nothing was queued (may belong to no session).

A message that needs a ``ts`` not known yet (the thread of a slash command whose first message is
still waiting for Slack) waits as a retry, and is woken (``deliveries.services.wake``) when the ``ts``
arrives, so the order in the thread holds even after an outage.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from integrations.deliveries.models import Delivery
from integrations.deliveries.senders import Outcome, Sender, register
from integrations.deliveries.services import enqueue, wake
from integrations.slack import client, messages
from integrations.slack.models import SlackThread
from sessions.models import Session, SessionBinding, Source
from sessions.signals import run_finished, run_started

log = logging.getLogger(__name__)

KIND = "slack"
# Slack's answers that mean "later": rate limits and its own trouble.
RETRY_ERRORS = {"ratelimited", "rate_limited", "fatal_error", "internal_error", "service_unavailable",
                "request_timeout", "team_added_to_org"}  # fmt: skip
DONE_ERRORS = {"already_reacted", "no_reaction"}


class Waiting(Exception):
    """The message needs a ``ts`` Slack has not given yet."""


def send_later(thread: SlackThread | None, op: str, key: str, *, session=None, event: str = "", run=None,
               target: str = "", **payload: Any) -> Delivery:  # fmt: skip
    session_id = thread.session_id if thread is not None else getattr(session, "pk", session)
    if not target and thread is not None:
        target = f"{thread.channel_id} {thread.thread_ts or '(thread not posted yet)'}"
    return enqueue(
        session=session_id, run=run, kind=KIND, event=event or op, target=target,
        payload={"op": op, **payload}, idempotency_key=key,
        max_attempts=settings.SLACK_DELIVERY_MAX_ATTEMPTS,
    )  # fmt: skip


def react(
    thread: SlackThread, name: str, key: str, *, remove: bool = False, ts: str = "", run=None
) -> Delivery:
    return send_later(thread, "react", key, name=name, remove=remove, ts=ts, run=run)


def ephemeral(channel: str, user: str, text: str, key: str, *, thread_ts: str = "", session=None) -> Delivery:
    return send_later(
        None, "ephemeral", key, session=session, target=f"{channel} (to {user})",
        channel=channel, user=user, text=text, thread_ts=thread_ts,
    )  # fmt: skip


def status_update(thread: SlackThread, key: str, run=None) -> Delivery:
    return send_later(thread, "update_status", key, run=run)


@register
class SlackSender(Sender):
    kind = KIND

    def send(self, delivery, attempt: int) -> Outcome:
        op = delivery.payload.get("op")
        thread = None
        if delivery.session_id is not None:
            thread = (
                SlackThread.objects.select_related("workspace").filter(session_id=delivery.session_id).first()
            )
            if thread is None and op != "ephemeral":
                return Outcome(ok=False, error="the session has no Slack thread")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return Outcome(ok=False, error=f"unknown Slack operation {op!r}")
        try:
            return handler(delivery, thread)
        except Waiting as exc:
            # Back-off as for any retry (a long outage must not use up the attempts); woken early
            # when what it waits for arrives.
            return Outcome(ok=False, retry=True, error=f"waiting: {exc}")

    # --- one Web API call each ------------------------------------------------------------------

    def op_post_root(self, delivery, thread: SlackThread) -> Outcome:
        if thread.thread_ts:  # posted already (a retry of an attempt whose answer was lost in the DB write)
            return Outcome(ok=True, excerpt=f"already posted as {thread.thread_ts}")
        p = delivery.payload
        result = client.call("chat.postMessage", channel=thread.channel_id, text=p["text"], blocks=p["blocks"],
                             unfurl_links=False)  # fmt: skip
        outcome = _outcome(result)
        if outcome.ok:
            ts = str(result.data.get("ts") or "")
            posted(thread, ts)
            outcome.excerpt = f"ts={ts}"
        return outcome

    def op_post_status(self, delivery, thread: SlackThread) -> Outcome:
        if thread.status_ts:
            return Outcome(ok=True, excerpt=f"already posted as {thread.status_ts}")
        if not thread.thread_ts:
            raise Waiting("the thread's first message is not posted yet")
        shown = messages.status(thread.session)
        result = client.call("chat.postMessage", channel=thread.channel_id, thread_ts=thread.thread_ts,
                             text=shown["text"], blocks=shown["blocks"], unfurl_links=False)  # fmt: skip
        outcome = _outcome(result)
        if outcome.ok:
            ts = str(result.data.get("ts") or "")
            SlackThread.objects.filter(pk=thread.pk, status_ts="").update(status_ts=ts)
            _wake(thread)
            outcome.excerpt = f"ts={ts} {shown['state']}"
        return outcome

    def op_update_status(self, delivery, thread: SlackThread) -> Outcome:
        thread.status_ts = (
            SlackThread.objects.filter(pk=thread.pk).values_list("status_ts", flat=True).first() or ""
        )
        if not thread.status_ts:
            post = _status_post(thread)
            if post in (Delivery.Status.PENDING, Delivery.Status.SENDING):
                raise Waiting("the status message is not posted yet")
            if post is None and not thread.thread_ts:
                return Outcome(
                    ok=True,
                    excerpt="skipped: the status message, not posted yet, will show the state of then",
                )
            return Outcome(ok=False, error="the status message was never posted; nothing to edit")
        shown = messages.status(thread.session)
        result = client.call("chat.update", channel=thread.channel_id, ts=thread.status_ts,
                             text=shown["text"], blocks=shown["blocks"])  # fmt: skip
        outcome = _outcome(result)
        outcome.excerpt = (outcome.excerpt + f" {shown['state']}").strip()
        return outcome

    def op_react(self, delivery, thread: SlackThread) -> Outcome:
        p = delivery.payload
        ts = p.get("ts") or thread.root_ts
        if not ts:
            raise Waiting("the thread's first message is not posted yet")
        method = "reactions.remove" if p.get("remove") else "reactions.add"
        return _outcome(client.call(method, channel=thread.channel_id, timestamp=ts, name=p["name"]))

    def op_post(self, delivery, thread: SlackThread) -> Outcome:
        if not thread.thread_ts:
            raise Waiting("the thread's first message is not posted yet")
        # The status message goes first, so the thread reads in order. Its ts (read fresh by send())
        # is written before its delivery is recorded as delivered, so the ts is what tells.
        if not thread.status_ts and _status_post(thread) in (
            Delivery.Status.PENDING,
            Delivery.Status.SENDING,
        ):
            raise Waiting("the status message goes first")
        p = delivery.payload
        result = client.call("chat.postMessage", channel=thread.channel_id, thread_ts=thread.thread_ts,
                             text=p["text"], blocks=p.get("blocks"), unfurl_links=False)  # fmt: skip
        outcome = _outcome(result)
        if outcome.ok:
            outcome.excerpt = f"ts={result.data.get('ts')}"
        return outcome

    def op_ephemeral(self, delivery, thread: SlackThread | None) -> Outcome:
        p = delivery.payload
        params = {"channel": p["channel"], "user": p["user"], "text": p["text"]}
        if p.get("thread_ts"):
            params["thread_ts"] = p["thread_ts"]
        return _outcome(client.call("chat.postEphemeral", **params))


def _status_post(thread: SlackThread) -> str | None:
    return (
        Delivery.objects.filter(kind=KIND, idempotency_key=f"status-post-{thread.session_id}", replay_of=None)
        .values_list("status", flat=True)
        .first()
    )


def _outcome(result: client.Result) -> Outcome:
    if result.ok:
        return Outcome(ok=True, status_code=result.status_code)
    if result.error in DONE_ERRORS:
        return Outcome(ok=True, status_code=result.status_code, excerpt=result.error)
    code = result.status_code
    retry = (
        result.transport_error
        or code == 429
        or (code is not None and code >= 500)
        or result.error in RETRY_ERRORS
    )
    return Outcome(
        ok=False, retry=retry, status_code=code, error=f"Slack answered {result.error}",
        excerpt=result.error, retry_after=result.retry_after,
    )  # fmt: skip


def posted(thread: SlackThread, ts: str) -> None:
    """A slash command's first message is in the channel: it is the thread from now on."""
    with transaction.atomic():
        changed = SlackThread.objects.filter(pk=thread.pk, thread_ts="").update(root_ts=ts, thread_ts=ts)
        if not changed:
            return
        thread.root_ts = thread.thread_ts = ts
        session = Session.objects.only("team_id").get(pk=thread.session_id)
        key = SlackThread.binding_key(thread.workspace.slack_team_id, thread.channel_id, ts)
        try:
            with transaction.atomic():
                SessionBinding.objects.create(
                    team_id=session.team_id, source=Source.SLACK, key=key, session_id=thread.session_id
                )
        except IntegrityError:
            pass  # bound already
        react(thread, "eyes", f"react-{thread.session_id}-eyes")
        send_later(thread, "post_status", f"status-post-{thread.session_id}")
    _wake(thread)


def _wake(thread: SlackThread) -> None:
    """Only those that waited for a ts: one backing off after a 429 keeps its Retry-After."""
    wake(Delivery.objects.filter(session_id=thread.session_id, kind=KIND, last_error__startswith="waiting:"))


# --- what makes them: the run's events (in the worker) and its end ---------------------------------

_is_slack: dict[int, bool] = {}
STATUS_EVENTS = {"todo", "progress"}  # a run's start comes by its own signal (on_run_started)


def _thread_of(session_id: int) -> SlackThread | None:
    known = _is_slack.get(session_id)
    if known is False:
        return None
    thread = SlackThread.objects.filter(session_id=session_id).first()
    if len(_is_slack) > 50_000:
        _is_slack.clear()
    _is_slack[session_id] = thread is not None
    return thread


def _throttle(thread: SlackThread) -> bool:
    """At most one edit per DEPUTIES_SLACK_STATUS_INTERVAL per thread, across processes: whoever
    moves ``status_queued`` forward queues the edit (which shows the state when it is sent)."""
    now = timezone.now()
    since = now - timedelta(seconds=settings.SLACK_STATUS_INTERVAL)
    return bool(
        SlackThread.objects.filter(pk=thread.pk)
        .filter(Q(status_queued__isnull=True) | Q(status_queued__lte=since))
        .update(status_queued=now)
    )


def on_events(events: list) -> None:
    """An ``events.add_listener`` listener (after commit, in the process that emitted them): a run's
    plan moved: update Slack. Never raises into the emitter."""
    try:
        wanted = [e for e in events if e.type in STATUS_EVENTS]
        if not wanted:
            return
        thread = _thread_of(wanted[0].session_id)
        if thread is None:
            return
        for event in wanted:
            run_id = event.run_id or event.payload.get("run_id")
            if _throttle(thread):
                status_update(thread, f"status-{run_id}-{time.time_ns() // 1_000_000}", run=run_id)
    except Exception:
        log.exception("slack: could not queue the status update of session %s", events[0].session_id)


@receiver(run_started, dispatch_uid="slack-run-started")
def on_run_started(
    sender, *, run_id: int, session_id: int, attempt: int, source: str | None = None, **kwargs
) -> None:
    """In the claim's transaction: the hourglass and the status edit (only Slack sessions have a
    thread). Never raises into the claim: what failed is rolled back to its savepoint."""
    if source is not None and source != Source.SLACK:
        return
    try:
        with transaction.atomic():
            thread = _thread_of(session_id)
            if thread is None:
                return
            react(thread, "hourglass_flowing_sand", f"react-{run_id}-hourglass", run=run_id)
            if attempt > 1:
                for done in ("white_check_mark", "x"):
                    react(thread, done, f"react-{run_id}-unset-{done}", remove=True, run=run_id)
            status_update(thread, f"status-start-{run_id}", run=run_id)
    except Exception:
        log.exception("slack: could not queue the status update of session %s", session_id)


@receiver(run_finished, dispatch_uid="slack-run-finished")
def on_run_finished(
    sender, *, run_id: int, session_id: int, status: str, error: str = "", source: str | None = None, **kwargs
) -> None:
    """In the transaction that ends the run: the reactions, the last status edit, the end message.
    Only Slack sessions have a thread (integrations/slack/handler.py starts them)."""
    if source is not None and source != Source.SLACK:
        return
    thread = SlackThread.objects.filter(session_id=session_id).first()
    if thread is None:
        return
    from integrations.deliveries.receivers import run_payload

    status = str(getattr(status, "value", status))
    react(thread, "hourglass_flowing_sand", f"react-{run_id}-unhourglass", remove=True, run=run_id)
    react(thread, "white_check_mark" if status == "completed" else "x", f"react-{run_id}-end", run=run_id)
    status_update(thread, f"status-end-{run_id}", run=run_id)
    shown = messages.final(run_payload(run_id, session_id, status, error))
    send_later(thread, "post", f"final-{run_id}", event=f"run.{status}", run=run_id, **shown)

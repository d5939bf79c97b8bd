"""One handler for both transports: the HTTP endpoints (views.py, after the signature check) and
Socket Mode (socket_mode.py) hand it the same parsed payloads and send back what it answers.

Each request is claimed once in ``SeenRequest`` (an event id, a command's or an action's trigger
id) as the last statement of the transaction that does its work, so Slack's retries, a replayed
request and the same event arriving over both transports never make a second session: the second
insert waits for the first transaction and fails, the duplicate's work rolls back, and it answers
as a duplicate.

Then: who may ask (access.py; a refusal is the ephemeral answer, nothing queued), what they ask
(``/deputy [repo] <prompt>``, ``@Deputies <prompt>``, a reply in a bound thread, a button), and the
session through ``sessions.bindings.start_or_follow_up`` or ``start_session``; what Slack should see
next is queued as deliveries (outbound.py) in the same transaction.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from integrations.slack import access, messages, outbound
from integrations.slack.access import Refused
from integrations.slack.models import SeenRequest, SlackThread
from sessions.bindings import BindingError, start_or_follow_up
from sessions.models import (
    Repository,
    Session,
    SessionBinding,
    SessionStatus,
    Source,
    model_problem,
    session_model,
    start_session,
    text_problem,
)

log = logging.getLogger(__name__)

SEEN_KEEP = timedelta(days=1)
MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
OWNER_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
_pruned = 0.0


@dataclass
class Answer:
    """What the transport sends back: HTTP 200 with ``body`` as JSON, or the Socket Mode ack payload."""

    body: dict[str, Any] = field(default_factory=dict)
    status: int = 200
    note: str = ""  # what happened, for logs and tests


class Duplicate(Exception):
    pass


def _claim(key: str, session: Session | None = None) -> None:
    """The last statement of a request's transaction: a duplicate fails here (its insert waits for
    the first request's transaction, then hits the unique key) and everything it did rolls back.
    Last rather than first, so a request that does its work costs no savepoint and no update."""
    try:
        SeenRequest.objects.create(key=key[:200], session=session)
    except IntegrityError:
        raise Duplicate(key) from None


def _prune() -> None:
    """Forget requests older than a day, at most once a minute per process, outside the request's
    transaction (concurrent deletes of the same rows would queue the requests behind each other)."""
    global _pruned
    now = time.monotonic()
    if now - _pruned > 60:
        _pruned = now
        SeenRequest.objects.filter(received__lt=timezone.now() - SEEN_KEEP).delete()


# --- slash command ----------------------------------------------------------------------------------


def handle_command(form: dict[str, str]) -> Answer:
    """``/deputy [repo] <prompt>``: answered at once (ephemeral), the work queued."""
    _prune()
    text = (form.get("text") or "").strip()
    if not text or text.lower() in ("help", "-h", "--help"):
        return Answer({"response_type": "ephemeral", "text": messages.usage()}, note="usage")
    key = f"command:{form.get('trigger_id') or form.get('team_id', '') + ':' + form.get('channel_id', '') + ':' + text}"
    try:
        with transaction.atomic():
            try:
                session = _command(form, text)
            except Refused as exc:
                _claim(key)
                return Answer({"response_type": "ephemeral", "text": f":no_entry: {exc}"}, note="refused")
            _claim(key, session)
    except Duplicate:
        return Answer(
            {
                "response_type": "ephemeral",
                "text": "Deputies already has this request; nothing new was queued.",
            },
            note="duplicate",
        )
    return Answer(messages.queued_answer(session), note=f"session {session.pk}")


def _command(form: dict[str, str], text: str) -> Session:
    place = access.place(form.get("team_id", ""), form.get("channel_id", ""))
    slack_user = form.get("user_id", "")
    user = access.deputies_user(place.workspace, slack_user)
    access.require_writer(place.team, user)
    repository, prompt = _repository_and_prompt(place, text)
    model, environment = _model(place)
    channel_name = form.get("channel_name") or (
        place.channel.name if place.channel else form.get("channel_id", "")
    )
    session = start_session(
        team=place.team, repository=repository, prompt=prompt, model=model, environment=environment,
        created_by=user, source=Source.SLACK,
        external_ref=_ref(place, form.get("channel_id", ""), slack_user, channel_name, trigger="command"),
    )  # fmt: skip
    thread = SlackThread.objects.create(
        session=session, workspace=place.workspace, channel_id=form.get("channel_id", ""),
        trigger=SlackThread.Trigger.COMMAND, requester=slack_user,
    )  # fmt: skip
    outbound.send_later(
        thread, "post_root", f"root-{session.pk}", **messages.root(session, slack_user, prompt)
    )
    return session


def _ref(place, channel_id: str, user: str, channel_name: str, trigger: str) -> dict[str, Any]:
    label = (
        channel_name if channel_name.startswith("#") or channel_name.startswith("C") else f"#{channel_name}"
    )
    return {
        "thread": f"Slack {label}",
        "slack": {"team_id": place.workspace.slack_team_id, "channel_id": channel_id, "user_id": user,
                  "trigger": trigger},
    }  # fmt: skip


def _repository_and_prompt(place: access.Place, text: str) -> tuple[Repository, str]:
    """The first word names the repository when it is one (its name in Deputies, or ``owner/name``
    matching its URL); otherwise the whole text is the prompt and the channel's default is used."""
    first, _, rest = text.partition(" ")
    found = _repository(place.team, first) if rest.strip() else None
    if found is not None:
        repository, prompt = found, rest.strip()
    elif place.channel is not None and place.channel.repository is not None:
        repository, prompt = place.channel.repository, text
    elif OWNER_NAME.match(first):
        raise Refused(f"No repository {first!r} in the Deputies team {place.team.slug!r}. {messages.usage()}")
    else:
        raise Refused(f"This channel has no default repository, so name one first. {messages.usage()}")
    if problem := text_problem(prompt, "prompt"):
        raise Refused(problem)
    return repository, prompt.strip()


def _repository(team, word: str) -> Repository | None:
    if not word:
        return None
    repos = Repository.objects.filter(team=team)
    found = repos.filter(name=word).first()
    if found is None and OWNER_NAME.match(word):
        for suffix in (f"/{word}", f"/{word}.git", f":{word}", f":{word}.git"):
            found = repos.filter(url__iendswith=suffix).order_by("pk").first()
            if found is not None:
                break
    return found


def _model(place: access.Place):
    channel = place.channel
    environment = channel.environment if channel else None
    model = session_model(channel.model if channel else "", environment=environment, team=place.team)
    if not model:
        raise Refused(
            "No model is configured for this channel (set one on the channel in Deputies, or DEPUTIES_DEFAULT_MODEL)."
        )
    if problem := model_problem(model):
        raise Refused(f"The channel's model cannot be used: {problem}")
    return model, environment


# --- Events API -------------------------------------------------------------------------------------


def handle_event(body: dict[str, Any], retry_num: str | int | None = None) -> Answer:
    kind = body.get("type")
    if kind == "url_verification":
        return Answer({"challenge": body.get("challenge", "")}, note="url_verification")
    if kind != "event_callback":
        return Answer({"ok": True}, note=f"ignored {kind}")
    _prune()
    event = body.get("event") or {}
    event_id = body.get("event_id") or f"{body.get('team_id')}:{event.get('channel')}:{event.get('ts')}"
    etype = event.get("type")
    if etype not in ("app_mention", "message"):
        return Answer({"ok": True}, note=f"ignored {etype}")
    bots = {a.get("user_id") for a in body.get("authorizations") or [] if a.get("user_id")}
    if etype == "message" and not _human_reply(event, bots):
        return Answer({"ok": True}, note="ignored message")
    team_id = body.get("team_id") or event.get("team") or ""
    try:
        with transaction.atomic():
            try:
                session, note = _event(team_id, event, etype, bots)
            except Refused as exc:
                _claim(f"event:{event_id}")
                outbound.ephemeral(
                    event.get("channel", ""), event.get("user", ""), f":no_entry: {exc}", f"refused-{event_id}",
                    thread_ts=event.get("thread_ts", ""),
                )  # fmt: skip
                return Answer({"ok": True}, note="refused")
            if session is not None:  # an ignored message (a thread that is not ours) leaves no row
                _claim(f"event:{event_id}", session)
    except Duplicate:
        return Answer({"ok": True}, note="duplicate" + (f" (retry {retry_num})" if retry_num else ""))
    return Answer({"ok": True}, note=note)


def _human_reply(event: dict[str, Any], bots: set[str]) -> bool:
    """A person's message in a thread (not the thread's first message, not a bot, not an edit),
    and not one that mentions the bot (that arrives again as ``app_mention``, handled there)."""
    if event.get("bot_id") or event.get("subtype") not in (None, "thread_broadcast", "file_share"):
        return False
    if not event.get("user") or not event.get("thread_ts") or event.get("thread_ts") == event.get("ts"):
        return False
    mentioned = set(MENTION.findall(event.get("text") or ""))
    return not (mentioned & bots)


def _event(team_id: str, event: dict[str, Any], etype: str, bots: set[str]) -> tuple[Session | None, str]:
    channel_id, slack_user, ts = event.get("channel", ""), event.get("user", ""), event.get("ts", "")
    thread_ts = event.get("thread_ts") or ts
    key = SlackThread.binding_key(team_id, channel_id, thread_ts)
    binding = SessionBinding.objects.select_related("session").filter(source=Source.SLACK, key=key).first()
    if etype == "message" and binding is None:
        return None, "ignored: not a Deputies thread"
    text = MENTION.sub(
        lambda m: "" if m.group(1) in bots or not bots else m.group(0), event.get("text") or ""
    ).strip()
    place = access.place(team_id, channel_id)
    user = access.deputies_user(place.workspace, slack_user)
    if binding is not None and binding.session.status != SessionStatus.ARCHIVED:
        return _follow_up(binding, user, slack_user, text, channel_id, ts, thread_ts, team_id), "follow-up"
    if not text:
        raise Refused(messages.usage())
    access.require_writer(place.team, user)
    repository, prompt = _repository_and_prompt(place, text)
    model, environment = _model(place)
    channel_name = place.channel.name if place.channel else channel_id
    try:
        routed = start_or_follow_up(
            team=place.team, source=Source.SLACK, key=key, prompt=prompt, thread=f"Slack {channel_name}",
            author=user, external_ref=_ref(place, channel_id, slack_user, channel_name, "mention")
            | {"slack_thread_ts": thread_ts}, repository=repository, model=model, environment=environment,
            created_by=user,
        )  # fmt: skip
    except BindingError as exc:
        raise Refused(str(exc)) from None
    session = routed.session
    if not routed.created:  # a concurrent first message of this thread won
        thread = SlackThread.objects.get(session=session)
        outbound.react(thread, "eyes", f"react-msg-{channel_id}-{ts}-eyes", ts=ts)
        return session, "follow-up"
    thread = SlackThread.objects.create(
        session=session, workspace=place.workspace, channel_id=channel_id, trigger=SlackThread.Trigger.MENTION,
        requester=slack_user, root_ts=ts, thread_ts=thread_ts,
    )  # fmt: skip
    outbound.react(thread, "eyes", f"react-{session.pk}-eyes")
    outbound.send_later(thread, "post_status", f"status-post-{session.pk}")
    return session, f"session {session.pk}"


def _follow_up(binding, user, slack_user: str, text: str, channel_id: str, ts: str, thread_ts: str,
               team_id: str) -> Session:  # fmt: skip
    session = binding.session
    access.require_writer(session.team, user)
    if problem := text_problem(text, "follow-up"):
        raise Refused(problem)
    routed = start_or_follow_up(
        team=session.team, source=Source.SLACK, key=binding.key, prompt=text, author=user,
        repository=session.repository, model=session.model, environment=session.environment, created_by=user,
    )  # fmt: skip
    thread = SlackThread.objects.filter(session=routed.session).first()
    if thread is not None:
        outbound.react(thread, "eyes", f"react-msg-{channel_id}-{ts}-eyes", ts=ts)
    return routed.session


# --- interactivity (buttons) ------------------------------------------------------------------------


def handle_interaction(payload: dict[str, Any]) -> Answer:
    if payload.get("type") != "block_actions":
        return Answer({}, note=f"ignored {payload.get('type')}")
    actions = [
        a for a in payload.get("actions") or [] if a.get("action_id") in (messages.CANCEL, messages.RETRY)
    ]
    if not actions:
        return Answer({}, note="ignored action")
    action = actions[0]
    team_id = (payload.get("team") or {}).get("id", "")
    slack_user = (payload.get("user") or {}).get("id", "")
    channel_id = (payload.get("channel") or {}).get("id", "")
    key = f"action:{payload.get('trigger_id') or action.get('action_ts')}"
    try:
        session_id = int(action.get("value") or 0)
    except ValueError:
        return Answer({}, note="bad value")
    try:
        with transaction.atomic():
            session = Session.objects.filter(
                pk=session_id, slack_thread__workspace__slack_team_id=team_id
            ).first()
            if session is None:
                return Answer({}, note="unknown session")
            try:
                place = access.place(team_id, channel_id)
                user = access.deputies_user(place.workspace, slack_user)
                access.require_writer(session.team, user)
            except Refused as exc:
                _claim(key, session)
                outbound.ephemeral(channel_id, slack_user, f":no_entry: {exc}", f"refused-{key}", session=session,
                                   thread_ts=session.slack_thread.thread_ts)  # fmt: skip
                return Answer({}, note="refused")
            # A button can be older than the state it acts on (clicked before its message was edited).
            if action["action_id"] == messages.CANCEL:
                if session.status in (SessionStatus.QUEUED, SessionStatus.RUNNING) and session.cancel():
                    note = "cancelled"
                else:
                    note = f"the session is {session.status} already"
            elif session.status not in (SessionStatus.FAILED, SessionStatus.CANCELLED):
                note = f"the session is {session.status}; only a failed or cancelled one is retried"
            else:
                run = session.retry()
                note = f"retried as run {run.pk}" if run else "not retried: a run is active"
            if not (note == "cancelled" or note.startswith("retried")):
                outbound.ephemeral(channel_id, slack_user, f"Nothing to do: {note}.", f"noop-{key}", session=session,
                                   thread_ts=session.slack_thread.thread_ts)  # fmt: skip
            _claim(key, session)
    except Duplicate:
        return Answer({}, note="duplicate")
    return Answer({}, note=note)

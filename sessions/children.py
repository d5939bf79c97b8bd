"""Child sessions: an agent fans out into sessions of its own team and waits for their results.

Three tools, offered to a session's agent while its depth is below ``DEPUTIES_CHILD_MAX_DEPTH``:
``spawn_session`` (a normal session, source ``agent``, linked to its parent), ``wait_sessions`` (their
final summaries and diff stats) and ``cancel_session``. They need the run they belong to, which the
workspace tools of sessions/agent/tools.py do not, so the loop dispatches them here.

Caps are counted in the database: a spawn locks its parent's row and counts the children under that
lock, so concurrent spawns cannot exceed ``DEPUTIES_CHILD_MAX_PER_SESSION``.

Money: every model call of a child adds its cost to ``children_cost_usd`` of each ancestor
(``charge_ancestors``, one statement, only for child sessions). A session's budget counts its own
spend plus its children's; a child also stops when an ancestor's budget is used up. The team's monthly
budget counts them anyway (children are sessions of the same team).

Waiting without holding anything: ``wait_sessions`` checks with backoff, giving its database
connection back between checks (sessions/workpool.py), and heartbeats so its lease stays alive. On
Postgres it also wakes at once when an event that may end the wait is committed (``_Wakeups``: a
child's status, a cancel or a steer of its own session). A run
waiting for children does not count against its team's concurrency limit (``Run.waiting``; the
claim's guard and sessions/limits.py skip it), otherwise a team at its limit whose runs all wait for
children would never start those children. It still occupies a thread of its worker's run pool
(``DEPUTIES_RUNS_PER_WORKER``), which is sized for dozens of runs.

Cancelling a session cancels its children, and theirs (``cancel_children``). Archiving does it
inside its transaction, holding the parent's row.

Lock order: sessions are locked top-down, ancestors before descendants. Cancelling or archiving
locks the session's row, then its children's; charging a child's model call locks its ancestors'
rows, oldest first (``charge_ancestors``), before its own (``Run.add_usage``, first in the loop's
transaction). In the other order an archive holding the parent and waiting for the child deadlocks
with a charge holding the child and waiting for the parent. Session rows are locked ``FOR NO KEY
UPDATE`` (``select_for_update(no_key=True)``, and the events statement), which leaves foreign-key
checks alone: a child's transaction that updates its row twice has its keys checked again at
commit, a key-share lock on the parent's row that a plain ``FOR UPDATE`` held by an archive
waiting for that child would block for good.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from sessions.agent.tools import ToolError, ToolResult, _spec, _validate
from sessions.events import emit
from sessions.models import (
    Artifact,
    Repository,
    Run,
    Session,
    SessionStatus,
    Source,
    model_problem,
    start_session,
    text_problem,
)

log = logging.getLogger(__name__)

FINAL = (SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED, SessionStatus.ARCHIVED)
POLL_FIRST, POLL_GROWTH, POLL_MAX = 0.1, 1.5, 5.0  # seconds between status polls in wait_sessions
SUMMARY_LIMIT = 4000  # characters of each child's summary returned to the model

SPECS: list[dict[str, Any]] = [
    _spec(
        "spawn_session",
        "Start a child session: another agent works on its own copy of a repository, in parallel, and "
        "reports back. Use it for independent subtasks; then call wait_sessions for the results.",
        {
            "prompt": {"type": "string", "minLength": 1, "description": "The child's complete task."},
            "repository": {
                "type": "string",
                "description": "Name of one of the team's repositories; this session's by default.",
            },
            "model": {"type": "string", "description": "provider/model; this session's by default."},
            "title": {"type": "string", "description": "A short title; the prompt's first line by default."},
        },
        ["prompt"],
    ),
    _spec(
        "wait_sessions",
        "Wait until child sessions have finished and return their final summaries, status and diff "
        "stats. Returns early (with what is still running) after `timeout` seconds or when a new "
        "instruction arrives for you.",
        {
            "session_ids": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "Children to wait for; all of this session's children by default.",
            },
            "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds to wait at most."},
        },
        [],
    ),
    _spec(
        "cancel_session",
        "Cancel one of your child sessions (and its own children).",
        {"session_id": {"type": "integer", "description": "The child session's id."}},
        ["session_id"],
    ),
]
NAMES = frozenset(spec["name"] for spec in SPECS)
# Safe to run again when a lost attempt left them unfinished (sessions/agent/loop.py): a spawn is
# keyed by its call, a wait only reads, cancelling a cancelled session changes nothing. So a resumed
# run gets their real result rather than "interrupted", and the model has no reason to spawn again.
RERUNNABLE = NAMES
_BY_NAME = {spec["name"]: spec for spec in SPECS}


class ChildLimit(ToolError):
    """A cap (depth, children per session) or the parent's state refuses a spawn."""


def tool_specs(session: Session) -> list[dict[str, Any]]:
    """The session tools this session's agent gets: none once it is as deep as children may go."""
    return list(SPECS) if session.depth < settings.CHILD_MAX_DEPTH else []


def execute(run: Run, name: str, arguments: dict[str, Any] | str | None, call_id: str = "") -> ToolResult:
    """Run one session tool for ``run``'s agent; a ToolError goes back to the model.

    ``call_id``: the model's tool call id. A spawn is keyed by it (with the run), so a resumed run
    that runs the call again gets the child the lost attempt started (``RERUNNABLE``).
    """
    args = _parse(name, arguments)
    if name == "spawn_session":
        child = spawn(
            run.session,
            args["prompt"],
            args.get("repository"),
            args.get("model"),
            args.get("title"),
            spawned_by=run if call_id else None,
            call_id=call_id,
        )
        return ToolResult(
            ok=True,
            output=f"Started child session {child.pk} ({child.title!r}) on {child.repository.name} with "
            f"{child.model}. Call wait_sessions to get its result.",
            extra={"session_id": child.pk},
        )
    if name == "wait_sessions":
        timeout = min(float(args.get("timeout") or settings.CHILD_WAIT_TIMEOUT), settings.CHILD_WAIT_TIMEOUT)
        results = wait(run, args.get("session_ids"), timeout)
        return ToolResult(ok=True, output=json.dumps(results, indent=1), extra={"sessions": results})
    child = Session.objects.filter(pk=args["session_id"], parent_id=run.session_id).first()
    if child is None:
        raise ToolError(f"cancel_session: session {args['session_id']} is not a child of this session")
    if not child.cancel():
        return ToolResult(ok=True, output=f"Session {child.pk} was already {child.status}.")
    return ToolResult(ok=True, output=f"Cancelled session {child.pk}.")


def _parse(name: str, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise ToolError(f"{name}: arguments are not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"{name}: arguments must be a JSON object, not {type(arguments).__name__}")
    _validate(name, "", arguments, _BY_NAME[name]["parameters"])
    return arguments


# --- spawning --------------------------------------------------------------------------------------


def spawn(
    parent: Session,
    prompt: str,
    repository: str | None = None,
    model: str | None = None,
    title: str | None = None,
    *,
    spawned_by: Run | None = None,
    call_id: str = "",
) -> Session:
    """A child session of ``parent``, queued; raises ChildLimit when a cap or the parent refuses.

    The parent's row lock orders concurrent spawns, and the children are counted under it.
    ``spawned_by`` and ``call_id`` (the parent's run and the model's tool call): when that call
    already started a child (the attempt that ran it was lost), that child, not a new one; a
    unique constraint backs the check.
    """
    if parent.depth + 1 > settings.CHILD_MAX_DEPTH:
        raise ChildLimit(
            f"spawn_session: child sessions may nest {settings.CHILD_MAX_DEPTH} deep "
            "(DEPUTIES_CHILD_MAX_DEPTH); do this work yourself"
        )
    if problem := text_problem(prompt, "prompt"):
        raise ToolError(f"spawn_session: {problem}")
    if model and (problem := model_problem(model)):
        raise ToolError(f"spawn_session: {problem}")
    with transaction.atomic():
        locked = (
            Session.objects.select_for_update(of=("self",), no_key=True)
            .select_related("team", "created_by")
            .get(pk=parent.pk)
        )
        if spawned_by is not None and call_id:
            started = Session.objects.filter(spawned_by=spawned_by, spawn_call_id=call_id)
            if (earlier := started.select_related("repository").first()) is not None:
                return earlier  # already counted, already announced
        if locked.status in (SessionStatus.CANCELLED, SessionStatus.ARCHIVED):
            raise ChildLimit(f"spawn_session: this session is {locked.status}")
        count = Session.objects.filter(parent_id=locked.pk).count()
        cap = settings.CHILD_MAX_PER_SESSION
        if count >= cap:
            raise ChildLimit(
                f"spawn_session: this session already has {count} child sessions, the most it may have "
                "(DEPUTIES_CHILD_MAX_PER_SESSION)"
            )
        if repository:
            target = Repository.objects.filter(team_id=locked.team_id, name=repository).first()
            if target is None:
                names = ", ".join(
                    Repository.objects.filter(team_id=locked.team_id).values_list("name", flat=True)
                )
                raise ToolError(f"spawn_session: no repository {repository!r} in this team (it has: {names})")
        else:
            target = Repository.objects.get(pk=locked.repository_id)
        child = start_session(
            team=locked.team,
            repository=target,
            prompt=prompt,
            model=model or locked.model,
            created_by=locked.created_by,
            base_branch=locked.base_branch if target.pk == locked.repository_id else "",
            environment=locked.environment,
            title=(title or "").strip()[:200],
            source=Source.AGENT,
            external_ref={"parent_session": locked.pk},
            parent=locked,
            spawned_by=spawned_by,
            spawn_call_id=call_id if spawned_by is not None else "",
        )
        emit(locked.pk, "child_spawned", {"session_id": child.pk, "title": child.title, "model": child.model})
    return child


# --- waiting ---------------------------------------------------------------------------------------

# A child's end and a cancel are "status" events, a steer is a "message" of the waiting run's session.
WAKE_TYPES = frozenset({"status", "message"})
NOTE_SESSION = re.compile(r'\{\s*"s"\s*:\s*(\d+)')  # the session a notification is about (notify.py)
LISTEN_READY_TIMEOUT = 2.0  # seconds a wait gives the listener to start before it looks anyway
LISTEN_WINDOW = 1.0  # seconds between the listener's checks whether any run still waits


class _Wakeups:
    """Wakes waiting runs when an event that may end their wait is committed.

    The signal is the event stream's own notification (the ``pg_notify`` in emit()'s statement,
    sessions/events.py), heard on one LISTEN connection per worker process that exists only while a
    run of that process waits: an idle worker holds no connection and sends nothing. A note about a
    session a run waits on, carrying a ``WAKE_TYPES`` event (or too large to carry its events), sets
    that run's ``threading.Event``; the wait then checks the database as it does after a poll. Other
    stream backends (SQLite's poll mode, Redis) send no ``pg_notify``: there, waits only poll.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[int, set[threading.Event]] = {}  # session id -> the waits to wake
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()  # the current listener's: set once it listens (or gave up)

    @contextmanager
    def watching(self, session_ids: Iterable[int]) -> Iterator[threading.Event]:
        wake = threading.Event()
        if settings.STREAM_BACKEND != "postgres":
            yield wake
            return
        ids = set(session_ids)
        with self.lock:
            for sid in ids:
                self.waiting.setdefault(sid, set()).add(wake)
            if self.thread is None or not self.thread.is_alive():  # (not alive: inherited by a fork)
                self.ready = threading.Event()
                self.thread = threading.Thread(
                    target=self._listen, args=(self.ready,), name="wait-wakeups", daemon=True
                )
                self.thread.start()
            ready = self.ready
        ready.wait(LISTEN_READY_TIMEOUT)  # listening before the wait's first look: no note is missed
        try:
            yield wake
        finally:
            with self.lock:
                for sid in ids:
                    wakes = self.waiting[sid]
                    wakes.discard(wake)
                    if not wakes:
                        del self.waiting[sid]

    def _listen(self, ready: threading.Event) -> None:
        from deputies.broker import listen_connection
        from sessions.streaming.notify import PG_CHANNEL

        conn = None
        try:
            conn = listen_connection("default")
            conn.execute(f"LISTEN {PG_CHANNEL}")
            ready.set()
            while True:
                with self.lock:
                    if not self.waiting:
                        self.thread = None
                        return
                for note in conn.notifies(timeout=LISTEN_WINDOW):
                    self._note(note.payload)
        except Exception as exc:  # waits go on polling; the next wait to start tries again
            log.warning("wait_sessions cannot listen for events (%s); waits poll instead", exc)
            with self.lock:
                if self.thread is threading.current_thread():
                    self.thread = None
        finally:
            ready.set()
            if conn is not None:
                conn.close()

    def _note(self, payload: str) -> None:
        match = NOTE_SESSION.match(payload)
        if match is None:
            return
        with self.lock:
            wakes = list(self.waiting.get(int(match[1]), ()))
        if not wakes:
            return
        events = json.loads(payload).get("e")
        if events is None or any(event.get("type") in WAKE_TYPES for event in events):
            for wake in wakes:
                wake.set()


_wakeups = _Wakeups()


def wait(run: Run, session_ids: list[int] | None, timeout: float) -> list[dict[str, Any]]:
    """Check the children until they are all final, the timeout passes, the run is cancelled or a
    steer message arrives (so the model sees it); then their results. Between checks it sleeps with
    backoff, or until ``_wakeups`` hears of an event that may end the wait."""
    from sessions.limits import wake_waiting_runs
    from sessions.workpool import release_connection

    children = Session.objects.filter(parent_id=run.session_id)
    if session_ids:
        ids = sorted(set(session_ids))
        unknown = sorted(set(ids) - set(children.filter(pk__in=ids).values_list("pk", flat=True)))
        if unknown:
            raise ToolError(
                f"wait_sessions: {', '.join(map(str, unknown))} are not child sessions of this session"
            )
    else:
        ids = sorted(children.values_list("pk", flat=True))
    if not ids:
        raise ToolError("wait_sessions: this session has no child sessions; start some with spawn_session")
    deadline = time.monotonic() + timeout
    steers = run.steers
    delay = POLL_FIRST
    interrupted = ""
    with _wakeups.watching([run.session_id, *ids]) as wake:
        Run.objects.filter(pk=run.pk).update(waiting=True)
        team_id = Session.objects.filter(pk=run.session_id).values_list("team_id", flat=True).get()
        try:
            wake_waiting_runs(team_id)  # this run's slot is free while it waits: its children may start
            while True:
                wake.clear()  # before looking: a note committed from here on ends the next sleep
                statuses = dict(Session.objects.filter(pk__in=ids).values_list("pk", "status"))
                if all(status in FINAL for status in statuses.values()):
                    break
                if not run.beat():
                    interrupted = "this run was stopped while waiting"
                    break
                if run.steers != steers:
                    interrupted = "a new instruction arrived; read it, then wait again if needed"
                    break
                if time.monotonic() >= deadline:
                    interrupted = f"timed out after {timeout:g} s; call wait_sessions again to keep waiting"
                    break
                release_connection()
                wake.wait(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * POLL_GROWTH, POLL_MAX)
        finally:
            Run.objects.filter(pk=run.pk).update(waiting=False)
    results = [_result(child) for child in Session.objects.filter(pk__in=ids).select_related("repository")]
    if interrupted:
        results.append({"note": interrupted})
    return results


def _result(child: Session) -> dict[str, Any]:
    result: dict[str, Any] = {
        "session_id": child.pk,
        "title": child.title,
        "status": child.status,
        "summary": child.summary[:SUMMARY_LIMIT],
        "cost_usd": str(child.cost_usd + child.children_cost_usd),
    }
    if child.error:
        result["error"] = child.error[:SUMMARY_LIMIT]
    result["diff"] = diff_stats(child)
    return result


def diff_stats(session: Session) -> dict[str, Any] | None:
    """Files, additions and deletions of the session's latest diff; None when it changed nothing."""
    from sessions.web.diff import read_diff

    artifact = session.artifacts.filter(kind=Artifact.Kind.DIFF).order_by("-created", "-pk").first()
    if artifact is None:
        return None
    diff = read_diff(artifact)
    return {
        "files": [f.path for f in diff.files],
        "additions": diff.additions,
        "deletions": diff.deletions,
        "branch": session.branch,
    }


# --- cancelling and money --------------------------------------------------------------------------


def cancel_children(session_id: int) -> list[int]:
    """Cancel the session's children that are still working (each cancels its own children)."""
    cancelled = []
    for child in Session.objects.filter(
        parent_id=session_id, status__in=(SessionStatus.QUEUED, SessionStatus.RUNNING)
    ):
        if child.cancel():
            cancelled.append(child.pk)
    return cancelled


def charge_ancestors(parent_id: int, cost: Decimal) -> None:
    """Add a child's model cost to ``children_cost_usd`` of its parent and each of theirs.

    On Postgres the rows are locked oldest ancestor first (by depth), the order in which archiving
    and cancelling take them (the module docstring); one UPDATE alone would lock them in whatever
    order its plan reads them.
    """
    table = connection.ops.quote_name(Session._meta.db_table)
    chain = (
        f"WITH RECURSIVE up(id) AS (SELECT CAST(%s AS bigint) UNION ALL "
        f"SELECT s.parent_id FROM {table} s JOIN up ON s.id = up.id WHERE s.parent_id IS NOT NULL)"
    )
    if connection.vendor == "postgresql":
        chain += (
            f", locked AS MATERIALIZED (SELECT id FROM {table} WHERE id IN (SELECT id FROM up) "
            "ORDER BY depth FOR NO KEY UPDATE)"
        )
        rows = "locked"
    else:
        rows = "up"
    sql = f"{chain} UPDATE {table} SET children_cost_usd = children_cost_usd + %s WHERE id IN (SELECT id FROM {rows})"
    with connection.cursor() as cursor:
        cursor.execute(sql, [parent_id, cost])


def ancestors(session: Session) -> list[Session]:
    """Its parent, their parent, ... (a query each; depth is capped by DEPUTIES_CHILD_MAX_DEPTH)."""
    chain: list[Session] = []
    parent_id = session.parent_id
    while parent_id and len(chain) < 32:
        parent = (
            Session.objects.only("pk", "parent_id", "cost_usd", "children_cost_usd", "budget_usd")
            .filter(pk=parent_id)
            .first()
        )
        if parent is None:
            break
        chain.append(parent)
        parent_id = parent.parent_id
    return chain


def ancestor_headroom(session: Session) -> tuple[Decimal, Session] | None:
    """The least any ancestor's budget has left (and that ancestor), or None when none has one."""
    tightest: tuple[Decimal, Session] | None = None
    default = Decimal(str(settings.SESSION_BUDGET_USD))
    for ancestor in ancestors(session):
        limit = ancestor.budget_usd if ancestor.budget_usd is not None else default
        if not limit:
            continue
        left = limit - ancestor.cost_usd - ancestor.children_cost_usd
        if tightest is None or left < tightest[0]:
            tightest = (left, ancestor)
    return tightest

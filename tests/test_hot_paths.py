"""The hot paths: one statement per emit (with its notification), group commit, and the session create
path's fixed number of queries."""

from __future__ import annotations

import json
import threading
from decimal import Decimal

import psycopg
import pytest
from django.db import connection, transaction
from django.db.utils import IntegrityError
from django.utils import timezone
from django_q.models import OrmQ
from django_q.signing import SignedPackage
from rest_framework.test import APIClient

from deputies.broker import CHANNEL as QUEUE_CHANNEL
from deputies.broker import NotifyingORM, listen_kwargs
from sessions import events
from sessions.columns import prepared_cursor
from sessions.events import emit, emit_many
from sessions.models import (
    APIToken,
    Environment,
    Event,
    Repository,
    Run,
    Session,
    Team,
    start_session,
)
from sessions.streaming.notify import PG_CHANNEL
from tests.conftest import client_for
from tests.live import wait_for

SESSIONS = "/api/v1/sessions"


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }


pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="Postgres statements")

DEADLINE = 10.0


@pytest.fixture
def make_session(team):
    repo = Repository.objects.create(team=team, name="r", url="/tmp/none", provider="local")

    def make() -> Session:
        return Session.objects.create(team=team, repository=repo, base_branch="main", model="scripted/demo")

    return make


@pytest.fixture
def listener():
    conn = psycopg.connect(**listen_kwargs())
    conn.execute(f"LISTEN {PG_CHANNEL}")
    yield conn
    conn.close()


def notes(conn, timeout: float = 0.2) -> list[dict]:
    return [json.loads(n.payload) for n in conn.notifies(timeout=timeout)]


def in_thread(fn, *args):
    """Run ``fn`` in a thread with its own connection (as a concurrent run would); return a handle."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            box["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


# --- emit: one statement, its notification delivered at commit ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_notifies_with_the_insert_and_only_at_commit(make_session, listener):
    session = make_session()
    with transaction.atomic():
        emit_many(session.pk, [("progress", {"message": "a"}), ("status", {"status": "running"})])
        assert notes(listener) == []  # nothing is announced before the rows are visible
    (note,) = notes(listener, timeout=2)
    assert (note["s"], note["m"], note["n"]) == (session.pk, 2, 2)
    assert [(e["seq"], e["type"], e["payload"]) for e in note["e"]] == [
        (1, "progress", {"message": "a"}),
        (2, "status", {"status": "running"}),
    ]
    stored = Event.objects.get(session=session, seq=1)
    assert note["e"][0]["created"] == stored.created.isoformat().replace("+00:00", "Z")
    assert note["e"][0]["run"] is None


@pytest.mark.django_db(transaction=True)
def test_it_never_notifies_a_rolled_back_event(make_session, listener):
    session = make_session()
    with pytest.raises(RuntimeError), transaction.atomic():
        emit(session.pk, "progress", {"message": "lost"})
        raise RuntimeError("boom")
    assert notes(listener) == []
    assert Session.objects.get(pk=session.pk).last_seq == 0


@pytest.mark.django_db(transaction=True)
def test_it_sends_only_the_range_when_the_events_do_not_fit_a_notification(make_session, listener):
    session = make_session()
    emit_many(session.pk, [("assistant_text", {"text": "x" * 3000})] * 3)
    (note,) = notes(listener, timeout=2)
    assert note == {"s": session.pk, "m": 3, "n": 3, "e": None}


@pytest.mark.django_db(transaction=True)
def test_it_writes_an_emit_with_one_statement(make_session, django_assert_num_queries):
    session = make_session()
    emit(session.pk, "progress", {"message": "warm"})  # the first use per connection sets it up
    with django_assert_num_queries(1):
        emit(session.pk, "progress", {"message": "one"})


def session_table_scans(plan: dict) -> list[str]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that reads the whole session table."""
    found = []
    if plan.get("Relation Name") == Session._meta.db_table and plan["Node Type"] == "Seq Scan":
        found.append(plan["Node Type"])
    for child in plan.get("Plans", []):
        found += session_table_scans(child)
    return found


@pytest.mark.django_db(transaction=True)
def test_an_emit_finds_its_sessions_by_key_not_by_scanning_the_table(make_session):
    """The statement's generic plan is used by every emit: a scan of the session table grew with
    the table and with its dead row versions (each emit leaves one), and cost a lone emit about
    five times its Postgres CPU with 4,100 sessions."""
    session = make_session()
    Session.objects.bulk_create(
        [Session(team=session.team, repository=session.repository, base_branch="main") for _ in range(300)]
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Session._meta.db_table}")
    emit(session.pk, "progress", {"message": "prepared"})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, parameter_types::text[] FROM pg_prepared_statements WHERE statement LIKE %s",
            # emit's own statement (the claim's and the end's also read an events document)
            ["%json_to_recordset%SELECT id, session_id, seq FROM ins WHERE%"],
        )
        ((name, types),) = cursor.fetchall()
        samples = {"json": "'[]'", "bigint[]": "'{}'", "text": "'x'", "boolean": "false"}
        cursor.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({', '.join(samples[t] for t in types)})")
        plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    assert session_table_scans(plan[0]["Plan"]) == []


@pytest.mark.django_db(transaction=True)
def test_it_returns_the_events_as_a_query_loads_them(make_session):
    session = make_session()
    run = Run.objects.create(session=session, attempt=1)
    returned = emit_many(session.pk, [("progress", {"n": 1}), ("todo", {"todos": []})], run_id=run.pk)
    loaded = list(Event.objects.filter(session=session).order_by("seq"))
    # Built without Model.__init__ (events._stored): the same attributes, values and state.
    assert [vars(e).keys() for e in returned] == [vars(e).keys() for e in loaded]
    assert [{k: v for k, v in vars(e).items() if k != "_state"} for e in returned] == [
        {k: v for k, v in vars(e).items() if k != "_state"} for e in loaded
    ]
    assert {(e._state.adding, e._state.db) for e in returned} == {(False, "default")}
    assert returned[0].run == run and returned[0].session == session


# --- group commit ---------------------------------------------------------------------------------------


def queued_behind_a_write(calls: list[tuple]) -> tuple[events._GroupCommit, list]:
    """Start ``calls`` (emit_many arguments) while the process's writer looks busy, so they queue
    up; then let the oldest write for all of them, as it would after a real write in flight."""
    group = events._group_commit()
    with group.lock:
        assert not group.writing
        group.writing = True
    before = group.batches
    handles = []
    for n, args in enumerate(calls, 1):
        handles.append(in_thread(emit_many, *args))
        wait_for(
            lambda n=n: len(group.queue) == n, timeout=DEADLINE, interval=0.002, what="the emit to queue up"
        )
    with group.lock:
        group.hand_over()  # what a finished writer does
    for thread, _ in handles:
        thread.join(DEADLINE)
    assert not group.writing
    return group, [box for _, box in handles], group.batches - before


@pytest.mark.django_db(transaction=True)
def test_it_writes_concurrent_emits_in_one_statement_with_gap_free_seqs(make_session, listener):
    a, b = make_session(), make_session()
    calls = [
        (a.pk, [("progress", {"i": 1})]),
        (b.pk, [("progress", {"i": 1}), ("progress", {"i": 2})]),
        (a.pk, [("progress", {"i": 2}), ("progress", {"i": 3})]),
    ]
    _, results, batches = queued_behind_a_write(calls)
    assert batches == 1
    assert [[e.seq for e in box["value"]] for box in results] == [[1], [1, 2], [2, 3]]
    for session in (a, b):
        rows = list(Event.objects.filter(session=session).order_by("seq").values_list("seq", "payload"))
        assert rows == [(i, {"i": i}) for i in range(1, len(rows) + 1)]
        assert Session.objects.get(pk=session.pk).last_seq == len(rows)
    by_session = {n["s"]: n for n in notes(listener, timeout=2)}
    assert [e["seq"] for e in by_session[a.pk]["e"]] == [1, 2, 3]  # one notification per session
    assert by_session[b.pk]["m"] == 2


@pytest.mark.django_db(transaction=True)
def test_it_fails_only_the_emit_that_spoiled_a_shared_statement(make_session):
    a = make_session()
    calls = [
        (a.pk, [("progress", {"i": 1})]),
        (a.pk, [("progress", {"i": 2})], 987654321),  # a run that does not exist
        (a.pk + 1000, [("progress", {"i": 3})]),  # a session that does not exist
        (a.pk, [("progress", {"i": 3})]),
    ]
    _, results, _ = queued_behind_a_write(calls)
    assert [e.seq for e in results[0]["value"]] == [1]
    assert isinstance(results[1]["error"], IntegrityError)
    assert isinstance(results[2]["error"], Session.DoesNotExist)
    assert [e.seq for e in results[3]["value"]] == [2]
    assert list(Event.objects.filter(session=a).order_by("seq").values_list("seq", flat=True)) == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_it_keeps_seqs_gap_free_under_many_concurrent_emitters(make_session):
    sessions = [make_session() for _ in range(3)]
    start = threading.Barrier(8)

    def run(session_id: int, n: int) -> list[int]:
        start.wait(DEADLINE)
        return [emit(session_id, "progress", {"n": i}).seq for i in range(n)]

    handles = [in_thread(run, sessions[i % 3].pk, 40) for i in range(8)]
    for thread, _ in handles:
        thread.join(DEADLINE * 3)
    for _, box in handles:
        assert "error" not in box, box
        assert box["value"] == sorted(box["value"])  # one emitter's events stay in its order
    for session in sessions:
        seqs = list(Event.objects.filter(session=session).order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, len(seqs) + 1))
        assert Session.objects.get(pk=session.pk).last_seq == len(seqs)
    assert Event.objects.count() == 8 * 40


# --- dispatch: POST /api/v1/sessions -> queued ----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_starts_a_session_in_a_fixed_number_of_queries(owner, repository, django_assert_num_queries):
    client = client_for(owner)
    body = {"repository": repository.pk, "prompt": "Fix it", "model": "scripted/demo"}
    client.post(SESSIONS, body, format="json")  # connection set-up (prepared statements) out of the way
    # the rate counters (one upsert), check (team + repository + role), BEGIN, session + branch +
    # message + run (one statement), events (+ NOTIFY), queue row (+ NOTIFY), COMMIT. Nothing is read back.
    with django_assert_num_queries(7):
        response = client.post(SESSIONS, body, format="json")
    assert response.status_code == 201
    # Built from the created objects, it is what a read gives.
    assert response.json() == client.get(f"{SESSIONS}/{response.json()['id']}").json()


@pytest.mark.django_db(transaction=True)
def test_it_shows_a_new_session_with_an_environment_as_a_read_would(owner, team, repository):
    environment = Environment.objects.create(team=team, name="py", default_model="scripted/env")
    client = client_for(owner)
    response = client.post(
        SESSIONS, {"repository": repository.pk, "prompt": "Go", "environment": environment.pk}, format="json"
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["environment"], body["model"]) == ({"id": environment.pk, "name": "py"}, "scripted/env")
    assert body == client.get(f"{SESSIONS}/{body['id']}").json()


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_viewer_with_403_on_the_short_path(viewer, repository):
    response = client_for(viewer).post(
        SESSIONS, {"repository": repository.pk, "prompt": "Go", "model": "scripted/demo"}, format="json"
    )
    assert response.status_code == 403
    assert Session.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_it_queues_the_run_in_the_same_transaction_and_wakes_workers_at_commit(team, owner, repository):
    wakeups = psycopg.connect(**listen_kwargs())
    try:
        wakeups.execute(f"LISTEN {QUEUE_CHANNEL}")
        with pytest.raises(RuntimeError), transaction.atomic():
            start_session(team=team, repository=repository, prompt="lost", model="scripted/demo")
            assert OrmQ.objects.count() == 1  # already there, in this transaction
            raise RuntimeError("boom")
        assert OrmQ.objects.count() == 0  # rolled back with the session: no task for a missing run
        assert list(wakeups.notifies(timeout=0.2)) == []
        with transaction.atomic():
            session = start_session(team=team, repository=repository, prompt="kept", model="scripted/demo")
            assert list(wakeups.notifies(timeout=0.1)) == []  # not before commit
        assert len(list(wakeups.notifies(timeout=2, stop_after=1))) == 1
    finally:
        wakeups.close()
    (task_id, payload), *rest = NotifyingORM(list_key="deputies").dequeue()
    assert rest == []
    assert SignedPackage.loads(payload)["args"] == (session.runs.get().pk,)
    assert OrmQ.objects.get(pk=task_id).lock > timezone.now()  # taken: not handed out again


@pytest.mark.django_db(transaction=True)
def test_the_worker_takes_a_backlog_a_few_tasks_per_statement(
    team, owner, repository, django_assert_num_queries
):
    for n in range(3):
        start_session(team=team, repository=repository, prompt=f"t{n}", model="scripted/demo")
    broker = NotifyingORM(list_key="deputies")  # which may close an old connection
    prepared_cursor().close()  # connection set-up (a SET once per connection) out of the way
    with django_assert_num_queries(1):
        taken = broker.dequeue(2)
    assert len(taken) == 2 and len(broker.dequeue(8)) == 1


@pytest.mark.django_db(transaction=True)
def test_the_claim_acknowledges_the_run_task_in_its_own_statement(
    team, owner, repository, django_assert_num_queries
):
    from sessions.runner import claim

    session = start_session(team=team, repository=repository, prompt="Go", model="scripted/demo")
    run_id = session.runs.get().pk
    emit(session.pk, "progress", {"message": "warm"})  # connection set-up out of the way
    [(task_id, _)] = NotifyingORM(list_key="deputies").dequeue()
    with django_assert_num_queries(3):  # BEGIN, the claim with the rows, the ack and the events, COMMIT
        run, why = claim(run_id, task_id)
    assert why == "claimed" and not OrmQ.objects.filter(pk=task_id).exists()
    duplicate = OrmQ.objects.create(key="deputies", payload="x", lock=timezone.now())
    assert claim(run_id, duplicate.pk) == (None, "skipped: run is running")
    assert not OrmQ.objects.filter(pk=duplicate.pk).exists()  # a duplicate delivery is done with


@pytest.mark.django_db(transaction=True)
def test_it_claims_a_run_with_its_messages_and_events_in_four_statements(
    team, owner, repository, django_assert_num_queries
):
    session = start_session(team=team, repository=repository, prompt="Go", model="scripted/demo")
    run = session.runs.get()
    emit(session.pk, "progress", {"message": "warm"})  # connection set-up out of the way
    with django_assert_num_queries(4):  # BEGIN, the claim, the events, COMMIT
        assert run.claim("worker-a") is True
    assert Session.objects.get(pk=session.pk).status == "running"
    assert list(session.messages.values_list("status", "run")) == [("claimed", run.pk)]
    assert list(session.events.order_by("seq").values_list("type", flat=True))[-2:] == [
        "run_started",
        "status",
    ]
    assert Run.objects.get(pk=run.pk).claim("worker-b") is False  # nothing else changes
    assert session.events.count() == 5


@pytest.mark.django_db(transaction=True)
def test_the_worker_claims_and_loads_a_run_in_one_statement(
    team, owner, repository, django_assert_num_queries
):
    from sessions.agent_models import AgentProfile, McpServer, Skill
    from sessions.runner import claim

    environment = Environment.objects.create(team=team, name="py", env_vars={"A": "1"}, cpu_limit=1.5)
    profile = AgentProfile.objects.create(team=team, name="p", allowed_tools=["read_file"], max_steps=7)
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner,
        environment=environment, profile=profile,
    )  # fmt: skip
    Session.objects.filter(pk=session.pk).update(transcript=[{"role": "user", "content": "earlier"}])
    session.add_message("and this")
    emit(session.pk, "progress", {"message": "warm"})  # connection set-up out of the way
    run_id = session.runs.get().pk
    with django_assert_num_queries(3):  # BEGIN, the claim with the rows and the events, COMMIT
        run, why = claim(run_id)
    assert why == "claimed"
    expected = Run.objects.select_related(
        "session__repository", "session__environment", "session__team", "session__profile"
    ).get(pk=run_id)
    with django_assert_num_queries(0):  # all of it loaded, as select_related would have
        pairs = [
            (run, expected),
            (run.session, expected.session),
            (run.session.repository, expected.session.repository),
            (run.session.environment, expected.session.environment),
            (run.session.team, expected.session.team),
            (run.session.profile, expected.session.profile),
        ]
        for loaded, orm in pairs:  # last_seq: the claim's own events came after
            fields = [f.attname for f in type(orm)._meta.concrete_fields if f.attname != "last_seq"]
            assert [getattr(loaded, f) for f in fields] == [getattr(orm, f) for f in fields], type(orm)
            assert not loaded._state.adding
    assert run.session.transcript == [{"role": "user", "content": "earlier"}]
    assert run.session.environment.env_vars == {"A": "1"} and run.session.profile.max_steps == 7
    assert run.claimed_prompts == ["Go", "and this"] and not run.recovered
    assert (run.only_run, run.team_skills, run.team_mcp_servers) == (True, False, False)
    assert list(session.messages.values_list("status", flat=True)) == ["claimed", "claimed"]

    # A follow-up run: the session had a run before; the team's skills and MCP servers are seen.
    Skill.objects.create(team=team, owner=owner, name="mine", description="d", body="b")
    McpServer.objects.create(team=team, name="docs", url="http://127.0.0.1:9/mcp")
    assert run.finish(Run.Status.COMPLETED)
    Session.objects.get(pk=session.pk).add_message("more")
    follow_up, _ = claim(session.runs.get(status="queued").pk)
    assert (follow_up.attempt, follow_up.claimed_prompts) == (2, ["more"])
    assert (follow_up.only_run, follow_up.team_skills, follow_up.team_mcp_servers) == (False, True, True)
    assert claim(follow_up.pk) == (None, "skipped: run is running")
    assert claim(follow_up.pk + 1000) == (None, "missing")


@pytest.mark.django_db(transaction=True)
def test_the_claims_own_events_are_what_emit_writes(team, repository, listener):
    """The claim's statement writes run_started and status itself: the same rows, seqs, payload
    text and notification as emit_many, with the attempt of the row it claimed; none if it did not
    claim; the session running unless it was closed meanwhile."""
    from sessions.runner import claim

    session = start_session(team=team, repository=repository, prompt="Go", model="scripted/demo")
    run_id = session.runs.get().pk
    Run.objects.filter(pk=run_id).update(attempt=12)  # two digits: the payload is built in SQL
    notes(listener)
    run, why = claim(run_id)
    assert why == "claimed" and run.session.status == "running"
    (raw,) = [n.payload for n in listener.notifies(timeout=2, stop_after=1)]
    assert f'"payload" : {{"run_id":{run_id},"attempt":12}}' in raw  # the text emit's JSON has
    note = json.loads(raw)
    assert [(e["seq"], e["type"], e["payload"], e["run"]) for e in note["e"]] == [
        (3, "run_started", {"run_id": run_id, "attempt": 12}, run_id),
        (4, "status", {"status": "running"}, run_id),
    ]
    assert (note["s"], note["m"], note["n"]) == (session.pk, 4, 2)
    rows = list(
        Event.objects.filter(session=session).order_by("seq").values_list("seq", "type", "payload", "run")
    )
    assert [seq for seq, *_ in rows] == [1, 2, 3, 4]
    assert rows[2:] == [
        (3, "run_started", {"run_id": run_id, "attempt": 12}, run_id),
        (4, "status", {"status": "running"}, run_id),
    ]
    assert Session.objects.get(pk=session.pk).status == "running"
    started = Event.objects.get(session=session, type="run_started").created
    assert started >= Run.objects.get(pk=run_id).started  # stamped after the claim, as emitted after it
    assert claim(run_id) == (None, "skipped: run is running")
    assert notes(listener) == [] and Session.objects.get(pk=session.pk).last_seq == 4

    # A session cancelled meanwhile stays cancelled; its run's claim still writes the events.
    other = start_session(team=team, repository=repository, prompt="Go", model="scripted/demo")
    Session.objects.filter(pk=other.pk).update(status="cancelled")
    run, why = claim(other.runs.get().pk)
    assert why == "claimed" and run.session.status != "running"
    assert Session.objects.get(pk=other.pk).status == "cancelled"
    assert list(other.events.order_by("seq").values_list("type", flat=True))[-2:] == ["run_started", "status"]


def _claimed_run(team, repository) -> Run:
    from sessions.runner import claim

    session = start_session(team=team, repository=repository, prompt="Go", model="scripted/demo")
    run, why = claim(session.runs.get().pk)
    assert why == "claimed"
    return run


ENDING = [("run_completed", {"run_id": 0, "summary": "done"}), ("status", {"status": "completed"})]


@pytest.mark.django_db(transaction=True)
def test_a_run_ends_with_its_events_in_one_statement(team, repository, listener, django_assert_num_queries):
    run = _claimed_run(team, repository)
    notes(listener)
    with django_assert_num_queries(3):  # BEGIN, the run, messages, session, sandbox and events, COMMIT
        assert run.finish(Run.Status.COMPLETED, session_fields={"summary": "done"}, events=ENDING)
    session = Session.objects.get(pk=run.session_id)
    assert (session.status, session.summary, session.last_seq) == ("completed", "done", 6)
    rows = list(session.events.order_by("seq").values_list("seq", "type", "payload", "run"))
    assert rows[-2:] == [(5, *ENDING[0], run.pk), (6, *ENDING[1], run.pk)]
    (note,) = notes(listener, timeout=2)
    assert [(e["seq"], e["type"], e["payload"]) for e in note["e"]] == [(5, *ENDING[0]), (6, *ENDING[1])]
    assert list(session.messages.values_list("status", flat=True)) == ["done"]
    assert not Run.objects.filter(session=session, status=Run.Status.QUEUED).exists()
    # Ended already (a cancel, say): nothing written, no event, no note.
    assert not Run.objects.get(pk=run.pk).finish(Run.Status.FAILED, "late", events=ENDING)
    assert Session.objects.get(pk=run.session_id).last_seq == 6 and notes(listener) == []


@pytest.mark.django_db(transaction=True)
def test_a_follow_up_committed_while_the_end_waits_for_the_session_starts_the_next_run(team, repository):
    """The end's statement reads the pending messages in its snapshot, taken before it waited for
    the session's row lock; a follow-up that add_message committed meanwhile must still be seen
    (add_message saw the run active and left the next run to the end)."""
    run = _claimed_run(team, repository)
    session = Session.objects.get(pk=run.session_id)
    locked, go = threading.Event(), threading.Event()

    def follow_up() -> None:
        with transaction.atomic():
            session.add_message("one more thing")  # holds the session's row lock until commit
            locked.set()
            go.wait(10)

    thread, box = in_thread(follow_up)
    assert locked.wait(10)
    ender, ended = in_thread(
        lambda: run.finish(Run.Status.COMPLETED, session_fields={"summary": "done"}, events=ENDING)
    )
    wait_for(lambda: waiting_for_lock(), what="the end to wait for the session's row lock")
    go.set()
    thread.join(10)
    ender.join(10)
    assert "error" not in box and "error" not in ended and ended["value"] is True
    follow = Run.objects.get(session=session, status=Run.Status.QUEUED)
    assert follow.attempt == 2
    pending = session.messages.filter(status="pending")
    assert list(pending.values_list("content", flat=True)) == ["one more thing"]


def waiting_for_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


@pytest.mark.django_db(transaction=True)
def test_it_starts_a_session_with_a_bearer_token_in_one_more_query(
    owner, repository, django_assert_num_queries
):
    token, secret = APIToken.issue(owner, name="ci")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    body = {"repository": repository.pk, "prompt": "Fix it", "model": "scripted/demo"}
    client.post(SESSIONS, body, format="json")  # last_used written, connection set up
    with django_assert_num_queries(8):  # the token with its user, then as above
        response = client.post(SESSIONS, body, format="json")
    assert response.status_code == 201
    assert response.json()["created_by"] == owner.username


@pytest.mark.django_db
def test_the_token_lookup_loads_what_the_orm_loads(owner):
    from sessions.api.auth import _token_with_user

    token, secret = APIToken.issue(owner, name="ci")
    APIToken.objects.filter(pk=token.pk).update(last_used=timezone.now())
    loaded = _token_with_user(APIToken.hash(secret))
    expected = APIToken.objects.select_related("user").get(pk=token.pk)
    fields = [f.attname for f in APIToken._meta.concrete_fields]
    assert [getattr(loaded, f) for f in fields] == [getattr(expected, f) for f in fields]
    user_fields = [f.attname for f in type(owner)._meta.concrete_fields]
    assert [getattr(loaded.user, f) for f in user_fields] == [getattr(expected.user, f) for f in user_fields]
    assert not loaded._state.adding and not loaded.user._state.adding
    assert _token_with_user(APIToken.hash("dep_unknown")) is None


@pytest.mark.django_db
def test_the_repository_check_loads_what_the_orm_loads(owner, viewer, team, repository):
    from sessions.api.views import _REPOSITORY_CHECK

    environment = Environment.objects.create(
        team=team, name="py", env_vars={"A": "1"}, cpu_limit=1.5, default_model="scripted/env"
    )
    found_team, found_repository, found_environment, role = _REPOSITORY_CHECK.fetch(
        repository.pk, environment.pk, owner.pk
    )
    assert role == "owner"
    for loaded, model in (
        (found_team, Team),
        (found_repository, Repository),
        (found_environment, Environment),
    ):
        expected = model.objects.get(pk=loaded.pk)
        fields = [f.attname for f in model._meta.concrete_fields]
        assert [getattr(loaded, f) for f in fields] == [getattr(expected, f) for f in fields]
    assert found_environment.env_vars == {"A": "1"}  # JSON decoded, as the ORM does
    assert found_repository.team is found_team
    # Another team's environment is not found; nor a membership the user lacks.
    other = Team.objects.create(name="Other", slug="other")
    theirs = Environment.objects.create(team=other, name="theirs")
    assert _REPOSITORY_CHECK.fetch(repository.pk, theirs.pk, owner.pk)[2] is None
    assert _REPOSITORY_CHECK.fetch(repository.pk, 0, viewer.pk)[3] == "viewer"
    stranger = type(owner).objects.create(username="stranger")
    assert _REPOSITORY_CHECK.fetch(repository.pk, 0, stranger.pk)[3] is None
    assert _REPOSITORY_CHECK.fetch(repository.pk + 1000, 0, owner.pk) is None


@pytest.mark.django_db
def test_start_session_stores_what_the_orm_would(team, owner, repository):
    environment = Environment.objects.create(team=team, name="py", env_vars={"A": "1"})
    session = start_session(
        team=team,
        repository=repository,
        prompt="  Fix the bug\nsecond line",
        model="scripted/demo",
        created_by=owner,
        environment=environment,
        external_ref={"thread": "t1"},
        budget_usd=Decimal("2.50"),
    )
    stored = Session.objects.get(pk=session.pk)
    fields = [f.attname for f in Session._meta.concrete_fields]
    for f in fields:
        if f != "last_seq":  # bumped in the database by the events
            assert getattr(session, f) == getattr(stored, f), f
    assert stored.branch == f"deputies/session-{session.pk}"
    assert (stored.title, stored.external_ref, stored.budget_usd) == (
        "Fix the bug",
        {"thread": "t1"},
        Decimal("2.50"),
    )
    assert (stored.environment_id, stored.environment_revision, stored.created_by_id) == (
        environment.pk,
        1,
        owner.pk,
    )
    assert stored.last_seq == 2
    (message,) = stored.messages.all()
    assert (message.position, message.content, message.status, message.author_id, message.run_id) == (
        1,
        "  Fix the bug\nsecond line",
        "pending",
        owner.pk,
        None,
    )
    (run,) = stored.runs.all()
    assert (run.attempt, run.status, run.pk) == (1, "queued", session.active_runs[0].pk)
    assert list(stored.events.order_by("seq").values_list("type", flat=True)) == ["status", "message"]
    assert stored.events.get(seq=2).payload["message_id"] == message.pk
    # The returned objects are saved ones: saving again updates the row.
    session.title = "renamed"
    session.save()
    assert Session.objects.count() == 1 and Session.objects.get(pk=session.pk).title == "renamed"


def test_psycopg_keeps_the_parsing_of_every_statement_of_start_session(team, owner, repository):
    """psycopg parses a statement's placeholders again on every execute when it has more
    parameters than its cache takes; start_session's insert has more than psycopg's default."""
    if connection.vendor != "postgresql":
        pytest.skip("needs Postgres")
    from psycopg import _queries

    counts: list[int] = []

    def record(execute, sql, params, many, context):
        counts.append(len(params or ()))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        start_session(team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner)
    assert max(counts) > 50  # the insert of the session, its first message and run
    assert max(counts) <= _queries.MAX_CACHED_STATEMENT_PARAMS

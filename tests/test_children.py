"""Child sessions: spawn, wait, cancel, caps, money and the team limit (issue 13, item 2)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.db.models import Sum

from sessions.agent.fake_llm import start_in_thread
from sessions.agent.tools import ToolError
from sessions.budgets import budget_problem
from sessions.children import ChildLimit, charge_ancestors, execute, spawn, tool_specs
from sessions.models import Event, LLMCall, Repository, Run, Session, SessionStatus, start_session
from tests.conftest import client_for
from tests.live import child_env, wait_for, worker_process


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""},
        "kid": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""},
    }
    settings.CHILD_MAX_DEPTH = 2
    settings.CHILD_MAX_PER_SESSION = 5


@pytest.fixture
def repository(team, sample_repo):
    return Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")


@pytest.fixture
def parent(team, owner, repository) -> Session:
    return start_session(team=team, repository=repository, prompt="Split the work", model="scripted/demo",
                         created_by=owner)  # fmt: skip


def worker_env(tmp_path, data_dir, parent_llm, child_llm, **extra: str) -> dict[str, str]:
    """A worker's environment with two scripted models: ``scripted`` for parents, ``kid`` for children."""
    return child_env(
        data_dir,
        DEPUTIES_LLM_PROVIDERS="scripted,kid",
        DEPUTIES_LLM_SCRIPTED_BASE_URL=parent_llm.base_url,
        DEPUTIES_LLM_KID_BASE_URL=child_llm.base_url,
        DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
        DEPUTIES_SANDBOX_ISOLATION="none",
        **extra,
    )


def race(count: int, attempt: Callable[[int], None]) -> None:
    """``attempt(n)`` in ``count`` threads at once, each on its own database connection."""
    barrier = threading.Barrier(count)

    def target(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            attempt(n)
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def claimed(session: Session) -> Run:
    run = Run.objects.select_related("session__team").get(session=session, status__in=Run.ACTIVE)
    assert run.claim("test")
    return run


@pytest.mark.django_db
def test_it_spawns_a_child_in_the_same_team_linked_to_its_parent(parent, owner):
    run = claimed(parent)
    result = execute(run, "spawn_session", json.dumps({"prompt": "Write the docs", "model": "kid/demo"}))
    child = Session.objects.get(pk=result.extra["session_id"])
    assert (child.parent_id, child.depth, child.team_id) == (parent.pk, 1, parent.team_id)
    assert (child.repository_id, child.base_branch, child.model) == (parent.repository_id, "main", "kid/demo")
    assert child.source == "agent" and child.created_by == owner and child.status == "queued"
    assert child.messages.get().content == "Write the docs"
    assert parent.events.filter(type="child_spawned", payload__session_id=child.pk).exists()

    api = client_for(owner).get(f"/api/v1/sessions/{parent.pk}").json()
    assert api["children"] == [{"id": child.pk, "title": "Write the docs", "status": "queued",
                                "cost_usd": "0.000000"}]  # fmt: skip
    assert api["parent"] is None and api["depth"] == 0
    assert client_for(owner).get(f"/api/v1/sessions/{child.pk}").json()["parent"] == parent.pk


@pytest.mark.django_db
def test_it_refuses_spawns_past_the_depth_cap_and_hides_the_tools_there(parent, settings):
    child = spawn(parent, "level 1")
    grandchild = spawn(child, "level 2")
    assert grandchild.depth == 2
    assert tool_specs(parent) and tool_specs(child) and tool_specs(grandchild) == []
    with pytest.raises(ChildLimit, match="DEPUTIES_CHILD_MAX_DEPTH"):
        spawn(grandchild, "level 3")
    settings.CHILD_MAX_DEPTH = 0
    assert tool_specs(parent) == []


@pytest.mark.django_db
def test_it_reports_bad_spawn_arguments_to_the_model(parent):
    run = claimed(parent)
    with pytest.raises(ToolError, match="'prompt' is required"):
        execute(run, "spawn_session", "{}")
    with pytest.raises(ToolError, match="no repository 'nope'"):
        execute(run, "spawn_session", {"prompt": "x", "repository": "nope"})
    with pytest.raises(ToolError, match="Unknown provider"):
        execute(run, "spawn_session", {"prompt": "x", "model": "mystery/model"})
    with pytest.raises(ToolError, match="not a child"):
        execute(run, "cancel_session", {"session_id": parent.pk})
    with pytest.raises(ToolError, match="no child sessions"):
        execute(run, "wait_sessions", {})
    assert not Session.objects.filter(parent=parent).exists()


@pytest.mark.django_db(transaction=True)
def test_it_creates_exactly_the_cap_when_ten_spawns_race(parent):
    outcomes: list[str] = []

    def attempt(n: int) -> None:
        try:
            spawn(Session.objects.get(pk=parent.pk), f"task {n}")
            outcomes.append("spawned")
        except ChildLimit:
            outcomes.append("refused")

    race(10, attempt)
    assert sorted(outcomes) == ["refused"] * 5 + ["spawned"] * 5
    assert Session.objects.filter(parent=parent).count() == 5


@pytest.mark.django_db
def test_it_gives_a_spawn_call_run_again_its_first_child_and_another_call_a_new_one(parent, settings):
    """What a resumed run does with a spawn its lost attempt had started: the same child back."""
    run = claimed(parent)
    settings.CHILD_MAX_PER_SESSION = 2
    first = execute(run, "spawn_session", {"prompt": "Write the docs"}, "call_a")
    again = execute(run, "spawn_session", {"prompt": "Write the docs"}, "call_a")
    assert again.extra == first.extra and again.output == first.output
    other = execute(run, "spawn_session", {"prompt": "Write the docs"}, "call_b")
    assert other.extra["session_id"] != first.extra["session_id"]
    # At the cap, the call that already has its child still gets it; a new call is refused.
    assert execute(run, "spawn_session", {"prompt": "Write the docs"}, "call_b").extra == other.extra
    with pytest.raises(ChildLimit, match="already has 2 child sessions"):
        execute(run, "spawn_session", {"prompt": "Write the docs"}, "call_c")
    children = Session.objects.filter(parent=parent)
    assert children.count() == 2
    assert sorted(children.values_list("spawn_call_id", flat=True)) == ["call_a", "call_b"]
    assert parent.events.filter(type="child_spawned").count() == 2
    # The key is the run's call: another session's run with the same call id gets its own child.
    other_parent = start_session(team=parent.team, repository=parent.repository, prompt="Other",
                                 model="scripted/demo")  # fmt: skip
    theirs = execute(claimed(other_parent), "spawn_session", {"prompt": "Write the docs"}, "call_a")
    assert theirs.extra["session_id"] not in children.values_list("pk", flat=True)


@pytest.mark.django_db(transaction=True)
def test_it_creates_one_child_per_call_when_each_call_races_itself(parent):
    """Ten spawns at once, two for each of five calls, against a cap of five: five children, and
    both spawns of a call get that call's child."""
    run = claimed(parent)
    got: dict[str, list[int]] = {}

    def attempt(n: int) -> None:
        call_id = f"call_{n % 5}"
        result = execute(Run.objects.get(pk=run.pk), "spawn_session", {"prompt": f"task {n}"}, call_id)
        got.setdefault(call_id, []).append(result.extra["session_id"])

    race(10, attempt)
    assert sorted(got) == [f"call_{n}" for n in range(5)]
    assert all(len(ids) == 2 and ids[0] == ids[1] for ids in got.values()), got
    assert Session.objects.filter(parent=parent).count() == 5


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_it_gives_a_run_resumed_after_its_worker_died_mid_spawn_the_child_it_had_started(
    settings, tmp_path, team, owner, repository
):
    """The worker is SIGKILLed after the child's commit and before the spawn's result is stored:
    the resumed run runs the call again and gets that child back, so it neither loses it
    ("interrupted") nor makes a second one. The window is held open by a trigger that makes
    Postgres sleep on that result's insert."""
    if connection.vendor != "postgresql":
        pytest.skip("holds the worker with a Postgres trigger")
    parent_script = {
        "responses": [
            {"tool_calls": [{"name": "spawn_session", "arguments": {"prompt": "Part", "model": "kid/demo"}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "The part is started."}}]},
        ]
    }
    # The parent does not wait for its child: the child's queued task may have gone with the
    # killed worker, and that is the queue's retry to recover, not this test's subject.
    child_script = {"responses": [{"content": "Part done."}]}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"
    table = connection.ops.quote_name(Event._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION test_hold_spawn_result() RETURNS trigger AS $$ BEGIN "
            "IF NEW.type = 'tool_finished' AND NEW.payload->>'name' = 'spawn_session' THEN "
            "PERFORM pg_sleep(120); END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        cursor.execute(
            f"CREATE TRIGGER test_hold_spawn_result BEFORE INSERT ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION test_hold_spawn_result()"
        )
    try:
        with start_in_thread(parent_script) as parent_llm, start_in_thread(child_script) as child_llm:
            env = worker_env(tmp_path, data_dir, parent_llm, child_llm, DEPUTIES_RUN_LEASE="4")
            with worker_process(env, name="worker-0") as proc:
                parent = start_session(team=team, repository=repository, prompt="Do the part",
                                       model="scripted/demo", created_by=owner)  # fmt: skip
                wait_for(_sleeping_backends, timeout=60, what="the spawn's result to be held")
                assert Session.objects.filter(parent=parent).count() == 1  # committed before its result
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            _end_sleeps()  # the killed worker's statement ends, rolled back (and the table is free)
            _drop_hold(table)
            with worker_process(env, name="worker-1"):
                wait_for(
                    lambda: Session.objects.get(pk=parent.pk).status in ("completed", "failed"),
                    timeout=90,
                    what="the resumed parent to finish",
                )
            chats = [r["body"] for r in parent_llm.requests if r["path"].endswith("/chat/completions")]
    finally:
        _end_sleeps()
        _drop_hold(table)
    parent.refresh_from_db()
    assert parent.status == "completed", (parent.error, (data_dir / "worker-1.log").read_text()[-3000:])
    (child,) = Session.objects.filter(parent=parent)
    assert parent.events.filter(type="run_resumed").exists()
    assert parent.events.filter(type="child_spawned").count() == 1
    (spawned,) = parent.events.filter(type="tool_finished", payload__name="spawn_session")
    assert spawned.payload["ok"] is True and "interrupted" not in spawned.payload
    assert spawned.payload["output"].startswith(f"Started child session {child.pk} ")
    assert parent.events.filter(type="tool_started", payload__call_id=spawned.payload["call_id"]).count() == 1
    # The model was not asked again for the spawn's step, and got the child's id back.
    assert len(chats) == 2
    assert chats[1]["messages"][-1]["content"] == spawned.payload["output"]


def _sleeping_backends() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'"
        )
        return [row[0] for row in cursor.fetchall()]


def _end_sleeps() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", [_sleeping_backends()])


def _drop_hold(table: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TRIGGER IF EXISTS test_hold_spawn_result ON {table}")
        cursor.execute("DROP FUNCTION IF EXISTS test_hold_spawn_result()")


@pytest.mark.django_db
def test_it_cancels_running_children_and_theirs_when_the_parent_is_cancelled(parent):
    claimed(parent)
    child = spawn(parent, "child")
    child_run = claimed(child)
    grandchild = spawn(child, "grandchild")
    done = spawn(parent, "already done")
    done_run = claimed(done)
    assert done_run.finish(Run.Status.COMPLETED)

    assert parent.cancel()
    child_run.refresh_from_db()
    assert child_run.status == Run.Status.CANCELLED
    assert Session.objects.get(pk=child.pk).status == SessionStatus.CANCELLED
    assert Session.objects.get(pk=grandchild.pk).status == SessionStatus.CANCELLED
    assert Session.objects.get(pk=done.pk).status == SessionStatus.COMPLETED  # finished work stays


@pytest.mark.django_db
def test_it_counts_a_childs_cost_against_its_ancestors_budgets(parent):
    child = spawn(parent, "child")
    grandchild = spawn(child, "grandchild")
    run = claimed(grandchild)
    run.add_usage(100, 10, 0, Decimal("0.30"))
    assert Session.objects.get(pk=child.pk).children_cost_usd == Decimal("0.30")
    assert Session.objects.get(pk=parent.pk).children_cost_usd == Decimal("0.30")
    assert Session.objects.get(pk=grandchild.pk).children_cost_usd == Decimal("0")

    Session.objects.filter(pk=parent.pk).update(budget_usd=Decimal("0.25"))
    assert "this session has spent $0.3000" in budget_problem(parent.pk)  # its children's spend
    assert "ancestor session" in budget_problem(grandchild.pk)
    assert "ancestor session" in budget_problem(child.pk)
    Session.objects.filter(pk=parent.pk).update(budget_usd=Decimal("5"))
    assert budget_problem(grandchild.pk) is None
    charge_ancestors(child.pk, Decimal("0.01"))  # the statement walks up from any level
    assert Session.objects.get(pk=parent.pk).children_cost_usd == Decimal("0.31")


def archive_while(parent: Session, parent_run: Run, work: Callable[[], None]) -> None:
    """Archive ``parent`` (its row, then its children's) while ``work`` (a child's transaction)
    runs: a third connection holds the parent's run, so the archive waits with the parent's row
    locked; ``work`` starts and waits for a row too (or gets through); then the hold lets go. Raises what either
    of them raised, e.g. Postgres's "deadlock detected" when each waits for the other."""
    errors: list[BaseException] = []
    pids: dict[str, int] = {}

    def in_thread(name: str, job: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    pids[name] = cursor.fetchone()[0]
                job()
            except BaseException as exc:  # noqa: BLE001 - raised below
                errors.append(exc)
            finally:
                connection.close()

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    def waiting_for_a_lock(name: str) -> bool:
        with connection.cursor() as cursor:  # asked inside a transaction: not its first snapshot
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pids.get(name, 0)])
            row = cursor.fetchone()
        return bool(row) and row[0] == "Lock"

    with transaction.atomic():
        Run.objects.select_for_update().get(pk=parent_run.pk)
        archiving = in_thread("archive", lambda: Session.objects.get(pk=parent.pk).archive())
        wait_for(lambda: waiting_for_a_lock("archive"), timeout=10, what="the archive to hold the parent")
        working = in_thread("work", work)
        wait_for(
            lambda: waiting_for_a_lock("work") or not working.is_alive(),
            timeout=10,
            what="the child's work to wait or end",
        )
    archiving.join(timeout=30)
    working.join(timeout=30)
    if errors:
        raise errors[0]


@pytest.mark.django_db(transaction=True)
def test_it_archives_a_parent_while_its_childs_model_cost_is_charged_without_a_deadlock(parent, settings):
    """The charge takes the parent's row before its own (sessions lock top-down), so it waits for
    the archive; charging the child's own rows first deadlocked."""
    from sessions.agent.llm import AttemptRecord, Usage
    from sessions.agent.loop import _Agent

    if connection.vendor != "postgresql":
        pytest.skip("row locks")
    settings.LLM_PRICES = {"kid/demo": {"input": 1.0, "output": 4.0}}
    parent_run = claimed(parent)
    child = spawn(parent, "child", model="kid/demo")
    child_run = claimed(child)

    def charge() -> None:  # the loop's own transaction for a model call's usage
        run = Run.objects.select_related("session__team").get(pk=child_run.pk)
        record = AttemptRecord("kid", "demo", 1, LLMCall.Outcome.OK, 200, 5, Usage(1_000_000, 0, 0))
        _Agent(run, None, None, []).save_attempt(record)

    archive_while(parent, parent_run, charge)
    parent.refresh_from_db()
    child.refresh_from_db()
    assert (parent.status, child.status) == (SessionStatus.ARCHIVED, SessionStatus.CANCELLED)
    assert child.cost_usd == parent.children_cost_usd == Decimal("1")
    assert LLMCall.objects.get(run=child_run).cost_usd == Decimal("1")


@pytest.mark.django_db(transaction=True)
def test_it_archives_a_parent_while_a_child_run_finishes_without_a_deadlock(parent):
    """A child's run finishing updates the child's row twice (its status, its events' numbers),
    so at commit Postgres checks the row's foreign keys again: a key-share lock on the parent's
    row, which the archive's plain FOR UPDATE would block while waiting for the child."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks")
    parent_run = claimed(parent)
    child = spawn(parent, "child")
    child_run = claimed(child)

    def finish() -> None:
        run = Run.objects.get(pk=child_run.pk)
        assert run.finish(Run.Status.COMPLETED, events=[("status", {"status": "completed"})])

    archive_while(parent, parent_run, finish)
    parent.refresh_from_db()
    child.refresh_from_db()
    assert (parent.status, child.status) == (SessionStatus.ARCHIVED, SessionStatus.COMPLETED)


@pytest.mark.django_db(transaction=True)
def test_it_does_not_count_a_parent_waiting_for_children_against_the_team_limit(parent, team):
    team.max_concurrent_runs = 1
    team.save()
    run = claimed(parent)
    child = spawn(parent, "child")
    child_run = Run.objects.select_related("session__team").get(session=child)
    assert child_run.claim("w") is False and child_run.waiting_for_team  # the parent holds the slot
    Run.objects.filter(pk=run.pk).update(waiting=True)  # what wait_sessions does while it waits
    assert child_run.claim("w") is True


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_it_runs_a_parent_that_spawns_three_children_waits_and_finishes_with_their_summaries(
    settings, tmp_path, team, owner, repository
):
    """A real worker, a team limited to one run at a time (so waiting must free the slot), two
    scripted models over HTTP: one for the parent, one for the children."""
    team.max_concurrent_runs = 1
    team.save()
    parent_script = {
        "responses": [
            {"tool_calls": [{"name": "spawn_session", "arguments": {"prompt": f"Part {n}", "model": "kid/demo"}}
                            for n in range(3)]},
            {"tool_calls": [{"name": "wait_sessions", "arguments": {}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "All three parts are done."}}]},
        ]
    }  # fmt: skip
    child_script = {
        "responses": [
            {"tool_calls": [{"name": "write_file", "arguments": {"path": "part.txt", "content": "done\n"}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "Child wrote part.txt."}}]},
        ]
    }
    prices = {"scripted/demo": {"input": 1.0, "output": 4.0}, "kid/demo": {"input": 2.0, "output": 8.0}}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"
    with start_in_thread(parent_script) as parent_llm, start_in_thread(child_script) as child_llm:
        env = worker_env(tmp_path, data_dir, parent_llm, child_llm, DEPUTIES_LLM_PRICES=json.dumps(prices))
        with worker_process(env):
            parent = start_session(team=team, repository=repository, prompt="Do it in three parts",
                                   model="scripted/demo", created_by=owner)  # fmt: skip
            wait_for(
                lambda: Session.objects.get(pk=parent.pk).status in ("completed", "failed"),
                timeout=120,
                what="the parent to finish",
            )
    parent.refresh_from_db()
    log = (data_dir / "worker.log").read_text()[-3000:]
    assert parent.status == "completed", (parent.error, log)
    assert parent.summary == "All three parts are done."
    children = list(Session.objects.filter(parent=parent).order_by("pk"))
    assert len(children) == 3 and all(c.status == "completed" for c in children)
    # The request after wait_sessions carries every child's summary and diff stats.
    chats = [r["body"] for r in parent_llm.requests if r["path"].endswith("/chat/completions")]
    waited = json.loads(chats[2]["messages"][-1]["content"])
    assert sorted(r["session_id"] for r in waited) == [c.pk for c in children]
    for result in waited:
        assert result["status"] == "completed" and result["summary"] == "Child wrote part.txt."
        assert result["diff"]["files"] == ["part.txt"] and result["diff"]["additions"] == 1
    # Costs add up: the parent's children_cost_usd is its children's spend, the team's is everything.
    assert parent.children_cost_usd == sum(c.cost_usd for c in children) > 0
    team_spend = LLMCall.objects.filter(session__team=team).aggregate(s=Sum("cost_usd"))["s"]
    assert team_spend == parent.cost_usd + parent.children_cost_usd
    assert not Run.objects.filter(waiting=True).exists()


@pytest.mark.django_db
def test_it_shows_the_session_tree_on_the_session_pages(parent, owner, client):
    child = spawn(parent, "Write the docs")
    grandchild = spawn(child, "Check the links")
    client.force_login(owner)
    page = client.get(f"/sessions/{parent.pk}").content.decode()
    assert 'id="session-tree"' in page
    assert f'href="/sessions/{child.pk}"' in page and f'href="/sessions/{grandchild.pk}"' in page
    assert f"Started child session #{child.pk}" in page  # the timeline's child_spawned item
    child_page = client.get(f"/sessions/{child.pk}").content.decode()
    assert "Spawned by" in child_page and f'href="/sessions/{parent.pk}"' in child_page
    lonely = start_session(
        team=parent.team, repository=parent.repository, prompt="alone", model="scripted/demo"
    )
    assert 'id="session-tree"' not in client.get(f"/sessions/{lonely.pk}").content.decode()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_it_cancels_running_children_when_a_waiting_parent_is_cancelled_on_a_real_worker(
    settings, tmp_path, team, owner, repository
):
    parent_script = {
        "responses": [
            {"tool_calls": [{"name": "spawn_session", "arguments": {"prompt": f"Slow part {n}", "model": "kid/demo"}}
                            for n in range(2)]},
            {"tool_calls": [{"name": "wait_sessions", "arguments": {}}]},
            {"content": "never reached"},
        ]
    }  # fmt: skip
    child_script = {"responses": [{"content": "too late", "delay": 4.0}]}  # the model "thinks" for 4 s
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"
    with start_in_thread(parent_script) as parent_llm, start_in_thread(child_script) as child_llm:
        env = worker_env(tmp_path, data_dir, parent_llm, child_llm)
        with worker_process(env):
            parent = start_session(team=team, repository=repository, prompt="Fan out", model="scripted/demo",
                                   created_by=owner)  # fmt: skip
            wait_for(
                lambda: (
                    Run.objects.filter(session__parent=parent, status="running").count() == 2
                    and Run.objects.filter(session=parent, waiting=True).exists()
                ),
                timeout=60,
                what="both children running while the parent waits",
            )
            reply = client_for(owner).post(f"/api/v1/sessions/{parent.pk}/cancel")
            assert reply.status_code == 200, reply.content
            children = Session.objects.filter(parent=parent)
            assert set(children.values_list("status", flat=True)) == {"cancelled"}
            assert set(Run.objects.filter(session__parent=parent).values_list("status", flat=True)) == {
                "cancelled"
            }
            # The parent's wait notices at its next poll and its run ends: no more model calls.
            wait_for(
                lambda: not Run.objects.filter(waiting=True).exists(), timeout=30, what="the wait to end"
            )
    chats = [r for r in parent_llm.requests if r["path"].endswith("/chat/completions")]
    assert len(chats) == 2  # spawn, wait; nothing after the cancel
    assert Session.objects.get(pk=parent.pk).status == "cancelled"
    assert not Run.objects.filter(status__in=Run.ACTIVE).exists()


@pytest.mark.django_db(transaction=True)
def test_it_stops_waiting_for_children_when_a_steer_message_arrives_or_the_timeout_passes(parent, owner):
    from sessions.children import wait

    run = claimed(parent)
    child = spawn(parent, "child")
    timed_out = wait(run, [child.pk], 0.3)
    assert timed_out[0]["status"] == "queued" and timed_out[-1]["note"].startswith("timed out after 0.3 s")

    results: list = []

    def waiter() -> None:
        try:
            results.append(wait(run, None, 30))
        finally:
            connection.close()

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: Run.objects.filter(pk=run.pk, waiting=True).exists(), timeout=10, what="the wait")
    parent.add_message("change of plan", author=owner, steer=True)
    thread.join(timeout=30)
    assert results and results[0][-1]["note"].startswith("a new instruction arrived")
    assert not Run.objects.get(pk=run.pk).waiting


@pytest.mark.django_db(transaction=True)
def test_it_wakes_a_waiting_run_at_once_when_a_child_ends_or_a_steer_arrives(parent, owner, monkeypatch):
    from sessions import children

    if connection.vendor != "postgresql":
        pytest.skip("the wake-up is the event stream's NOTIFY; on SQLite a wait only polls")
    monkeypatch.setattr(children, "POLL_FIRST", 120.0)  # a wait that only polled would sleep 30 s here
    run = claimed(parent)
    first, second = spawn(parent, "first"), spawn(parent, "second")

    def wait_woken_by(session: Session, event: Callable[[], object]) -> list:
        results: list = []

        def waiter() -> None:
            try:
                results.append(children.wait(run, [session.pk], 30))
            finally:
                connection.close()

        thread = threading.Thread(target=waiter)
        thread.start()
        wait_for(lambda: Run.objects.filter(pk=run.pk, waiting=True).exists(), timeout=10, what="the wait")
        event()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the wait slept on instead of waking"
        return results[0]

    ended = wait_woken_by(first, first.cancel)
    assert [r["status"] for r in ended] == ["cancelled"]  # all final: no note
    steered = wait_woken_by(second, lambda: parent.add_message("change of plan", author=owner, steer=True))
    assert steered[0]["status"] == "queued" and steered[-1]["note"].startswith("a new instruction arrived")
    # The listener goes with the last wait: an idle worker keeps no connection for it.
    wait_for(lambda: children._wakeups.thread is None, timeout=10, what="the listener to stop")


@pytest.mark.django_db
def test_it_clears_the_waiting_mark_of_a_run_whose_worker_was_lost(parent):
    from datetime import timedelta

    from django.utils import timezone

    run = claimed(parent)
    old = timezone.now() - timedelta(hours=1)
    Run.objects.filter(pk=run.pk).update(waiting=True, heartbeat=old)
    assert Run.recover_stale(timezone.now() - timedelta(minutes=5)) == [run.pk]
    run.refresh_from_db()
    assert (run.status, run.waiting) == (Run.Status.QUEUED, False)  # it counts for its team again

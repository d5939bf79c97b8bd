"""The websocket consumers on the real ASGI application: access, replay, live pushes, reconnects.

Events are written with the real emit() from another thread (its own database connection), so
they reach the consumer the way a worker's would: through the database and the notifier.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.db import connection, connections
from django.test import Client

from deputies.asgi import application
from sessions.events import emit, emit_many
from sessions.models import Event, Repository, Session, Team
from sessions.streaming.hub import close_hub, get_hub

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

TIMEOUT = 10


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


REDIS_URL = os.environ.get("DEPUTIES_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def use_backend(settings, backend: str) -> None:
    """Switch the transport for this test (the hub is made per event loop, so per test)."""
    if backend == "postgres" and connection.vendor != "postgresql":
        pytest.skip("LISTEN/NOTIFY needs Postgres")
    if backend == "redis":
        if not redis_answers(REDIS_URL):
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true needs Redis at {REDIS_URL}")
            pytest.skip(f"Redis does not answer at {REDIS_URL}")
        settings.REDIS_URL = REDIS_URL
    settings.STREAM_BACKEND = backend
    settings.STREAM_POLL_INTERVAL = 0.05


@pytest.fixture(autouse=True)
def default_backend(settings):
    # Whatever the environment says, these tests pick their transport explicitly.
    settings.STREAM_BACKEND = "postgres" if connection.vendor == "postgresql" else "poll"


@pytest_asyncio.fixture(autouse=True)
async def stop_hub():
    yield
    await close_hub()
    await sync_to_async(connections.close_all)()  # the thread that ran the consumers' queries


@pytest.fixture
def session(team, owner) -> Session:
    repo = Repository.objects.create(team=team, name="r", url="/tmp/none", provider="local")
    return Session.objects.create(team=team, repository=repo, base_branch="main", model="scripted/demo")


def login_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


def communicator(path: str, user=None) -> WebsocketCommunicator:
    headers = [(b"host", b"testserver"), (b"origin", b"http://testserver")]
    if user is not None:
        headers.append((b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={login_cookie(user)}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def connect(path: str, user) -> WebsocketCommunicator:
    comm = await sync_to_async(communicator)(path, user)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    return comm


async def close_code(comm: WebsocketCommunicator) -> int:
    """The code of a connection the server accepts and then closes."""
    connected, code = await comm.connect(timeout=TIMEOUT)
    if connected:
        output = await comm.receive_output(TIMEOUT)
        assert output["type"] == "websocket.close", output
        code = output.get("code")
    await comm.disconnect()
    return code


async def frames(comm: WebsocketCommunicator, count: int) -> list[dict]:
    return [json.loads(await comm.receive_from(TIMEOUT)) for _ in range(count)]


async def seqs(comm: WebsocketCommunicator, count: int) -> list[int]:
    received = await frames(comm, count)
    assert all(f["type"] == "event" for f in received), received
    return [f["event"]["seq"] for f in received]


def _in_thread(fn, *args, **kwargs):
    """Run ORM work in a fresh thread with its own connection, like another process would."""
    result: list = []
    error: list[BaseException] = []

    def target():
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def emit_elsewhere(session_id: int, count: int = 1, type: str = "progress", **payload) -> list[int]:
    def run():
        return [emit(session_id, type, {"n": i, **payload}).seq for i in range(count)]

    return await asyncio.to_thread(_in_thread, run)


async def db_seqs(session_id: int) -> list[int]:
    return await sync_to_async(
        lambda: list(
            Event.objects.filter(session_id=session_id).order_by("seq").values_list("seq", flat=True)
        )
    )()


# --- access -----------------------------------------------------------------------------------


async def test_it_streams_a_session_to_its_owner_and_a_teammate(session, owner, teammate):
    await emit_elsewhere(session.pk, 3)
    for user in (owner, teammate):
        comm = await connect(f"/ws/sessions/{session.pk}/", user)
        assert await seqs(comm, 3) == [1, 2, 3]
        await comm.disconnect()


async def test_it_lets_staff_stream_any_session(session):
    admin = await sync_to_async(get_user_model().objects.create_user)(
        "admin", "a@example.com", "pw", is_staff=True
    )
    await emit_elsewhere(session.pk, 1)
    comm = await connect(f"/ws/sessions/{session.pk}/", admin)
    assert await seqs(comm, 1) == [1]
    await comm.disconnect()


async def test_it_closes_an_anonymous_connection_with_4401(session):
    assert await close_code(communicator(f"/ws/sessions/{session.pk}/")) == 4401
    assert await close_code(communicator("/ws/sessions/")) == 4401


async def test_it_answers_an_outsider_as_if_the_session_did_not_exist(session, outsider):
    await emit_elsewhere(session.pk, 1)
    codes = [
        await close_code(await sync_to_async(communicator)(path, outsider))
        for path in (
            f"/ws/sessions/{session.pk}/",
            f"/ws/sessions/{session.pk + 1000}/",
            "/ws/sessions/99999999999999999999/",
        )
    ]
    assert codes == [4404, 4404, 4404]


async def test_it_refuses_a_page_from_another_origin(session, owner, settings):
    settings.ALLOWED_HOSTS = ["testserver"]
    from channels.routing import URLRouter
    from channels.security.websocket import AllowedHostsOriginValidator

    from deputies.routing import websocket_urlpatterns
    from sessions.streaming.wire import SessionAuthMiddleware

    # Built here: the validator reads ALLOWED_HOSTS when it is made, at import in deputies.asgi.
    app = AllowedHostsOriginValidator(SessionAuthMiddleware(URLRouter(websocket_urlpatterns)))
    cookie = await sync_to_async(login_cookie)(owner)
    comm = WebsocketCommunicator(
        app,
        f"/ws/sessions/{session.pk}/",
        headers=[(b"origin", b"http://evil.example"), (b"cookie", f"sessionid={cookie}".encode())],
    )
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert not connected


# --- replay and live pushes -----------------------------------------------------------------------


async def test_it_replays_only_the_events_after_the_cursor(session, owner):
    await emit_elsewhere(session.pk, 5)
    comm = await connect(f"/ws/sessions/{session.pk}/?after=3", owner)
    first, second = await frames(comm, 2)
    assert [first["event"]["seq"], second["event"]["seq"]] == [4, 5]
    stored = await sync_to_async(Event.objects.get)(session=session, seq=4)
    assert first["event"]["type"] == "progress" and first["event"]["payload"] == {"n": 3}
    assert first["event"]["run"] is None and first["event"]["created"].startswith(str(stored.created.date()))
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [6]  # the next frame is the new event: nothing was repeated
    await comm.disconnect()


async def test_it_replays_a_long_history_page_by_page(session, owner):
    await asyncio.to_thread(_in_thread, emit_many, session.pk, [("progress", {"message": "m"})] * 1203)
    comm = await connect(f"/ws/sessions/{session.pk}/?after=1", owner)
    assert await seqs(comm, 1202) == list(range(2, 1204))
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [1204]
    await comm.disconnect()


@pytest.mark.parametrize("backend", ["postgres", "redis", "poll"])
async def test_it_pushes_events_written_by_another_connection(session, owner, settings, backend):
    use_backend(settings, backend)
    comm = await connect(f"/ws/sessions/{session.pk}/", owner)
    assert get_hub().backend == backend
    await emit_elsewhere(session.pk, 3, text="hello")
    received = await frames(comm, 3)
    assert [f["event"]["seq"] for f in received] == [1, 2, 3]
    assert received[0]["event"]["payload"] == {"n": 0, "text": "hello"}
    # A batch too large to travel in a notification is read from the database instead.
    await asyncio.to_thread(_in_thread, emit_many, session.pk, [("assistant_text", {"text": "x" * 3000})] * 4)
    assert await seqs(comm, 4) == [4, 5, 6, 7]
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [8]
    await comm.disconnect()


async def test_it_reads_a_gap_from_the_database_when_notifications_were_lost(session, owner, settings):
    comm = await connect(f"/ws/sessions/{session.pk}/", owner)
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [1]
    # The notifier fails (a Redis that is down): emit() still succeeds, only the push is lost.
    backend = settings.STREAM_BACKEND
    settings.STREAM_BACKEND, settings.REDIS_URL = "redis", "redis://127.0.0.1:1/0"
    assert await emit_elsewhere(session.pk, 4) == [2, 3, 4, 5]
    settings.STREAM_BACKEND = backend
    # The next notification says 6; the consumer is at 1 and reads 2..5 from the rows first.
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 5) == [2, 3, 4, 5, 6]
    await comm.disconnect()


async def test_it_finds_events_written_by_another_process_by_polling(session, owner, settings):
    """Simple mode (SQLite): the worker's emit() cannot reach the web process; polling does."""
    use_backend(settings, "poll")
    events = await connect(f"/ws/sessions/{session.pk}/", owner)
    sessions = await connect("/ws/sessions/", owner)
    # Writes whose notification goes nowhere, like a worker's in another process.
    settings.STREAM_BACKEND, settings.REDIS_URL = "redis", "redis://127.0.0.1:1/0"
    await emit_elsewhere(session.pk, 2)
    await asyncio.to_thread(_in_thread, emit, session.pk, "status", {"status": "running"})
    assert await seqs(events, 3) == [1, 2, 3]
    frame = json.loads(await sessions.receive_from(TIMEOUT))
    assert frame["session"]["id"] == session.pk
    await events.disconnect()
    await sessions.disconnect()


async def test_it_loses_nothing_and_repeats_nothing_across_a_reconnect(session, owner):
    await emit_elsewhere(session.pk, 3)
    comm = await connect(f"/ws/sessions/{session.pk}/", owner)
    received = await seqs(comm, 2)
    await comm.disconnect()
    await emit_elsewhere(session.pk, 2)  # written while nobody listens

    comm = await connect(f"/ws/sessions/{session.pk}/?after={received[-1]}", owner)
    received += await seqs(comm, 3)
    await emit_elsewhere(session.pk, 2)
    received += await seqs(comm, 2)
    assert received == await db_seqs(session.pk) == list(range(1, 8))
    await comm.disconnect()


async def test_it_keeps_many_subscribers_in_order(session, owner, teammate):
    comms = [await connect(f"/ws/sessions/{session.pk}/", user) for user in (owner, teammate) * 5]

    async def burst(start: int):
        def run():
            for i in range(10):
                emit_many(session.pk, [("progress", {"i": start + i})] * (1 + i % 3))

        await asyncio.to_thread(_in_thread, run)

    await asyncio.gather(burst(0), burst(100))  # two writers racing for the same session
    expected = await db_seqs(session.pk)
    assert expected == list(range(1, 39))
    for comm in comms:
        assert await seqs(comm, 38) == expected
        await comm.disconnect()


async def test_it_catches_up_after_the_listener_connection_drops(session, owner):
    if connection.vendor != "postgresql":
        pytest.skip("LISTEN/NOTIFY needs Postgres")
    comm = await connect(f"/ws/sessions/{session.pk}/", owner)
    hub = get_hub()
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [1]

    def kill_listener() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'deputies-stream' AND datname = current_database()"
            )
            return cursor.rowcount

    assert await asyncio.to_thread(_in_thread, kill_listener) == 1
    await emit_elsewhere(session.pk, 3)  # may be written while the hub is not listening
    assert await seqs(comm, 3) == [2, 3, 4]
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while hub.reconnects < 1:
        assert asyncio.get_running_loop().time() < deadline, "the listener did not reconnect"
        await asyncio.sleep(0.01)
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [5]
    await comm.disconnect()


async def test_it_catches_up_after_the_redis_subscription_drops(session, owner, settings):
    use_backend(settings, "redis")
    comm = await connect(f"/ws/sessions/{session.pk}/", owner)
    hub = get_hub()
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [1]

    def kill_subscription() -> int:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        mine = [c for c in client.client_list() if c.get("name") == f"deputies-stream-{os.getpid()}"]
        for c in mine:
            client.client_kill_filter(_id=c["id"])
        return len(mine)

    assert await asyncio.to_thread(kill_subscription) == 1
    await emit_elsewhere(session.pk, 3)
    assert await seqs(comm, 3) == [2, 3, 4]
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while hub.reconnects < 1:
        assert asyncio.get_running_loop().time() < deadline, "the subscription was not renewed"
        await asyncio.sleep(0.01)
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [5]
    await comm.disconnect()


async def test_it_answers_a_ping_with_a_pong(session, owner):
    comm = await connect(f"/ws/sessions/{session.pk}/", owner)
    await comm.send_json_to({"type": "ping"})
    assert await comm.receive_json_from(TIMEOUT) == {"type": "pong"}
    await comm.disconnect()


# --- the session list -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres", "redis", "poll"])
async def test_it_pushes_status_changes_to_the_session_list(
    session, owner, outsider, other_team, settings, backend
):
    use_backend(settings, backend)
    theirs = await sync_to_async(Session.objects.create)(
        team=other_team,
        repository=await sync_to_async(Repository.objects.create)(team=other_team, name="o", url="/tmp/o"),
        base_branch="main",
        model="scripted/demo",
        title="Theirs",
    )
    mine = await connect("/ws/sessions/", owner)
    others = await connect("/ws/sessions/", outsider)

    def start():
        Session.objects.filter(pk=session.pk).update(status="running", title="Fix it")
        emit(session.pk, "status", {"status": "running"})
        emit(session.pk, "progress", {"message": "not a list change"})
        Session.objects.filter(pk=session.pk).update(input_tokens=10, output_tokens=2, cost_usd="0.5")
        emit(session.pk, "usage", {"input_tokens": 10, "output_tokens": 2})

    await asyncio.to_thread(_in_thread, start)
    seen = [json.loads(await mine.receive_from(TIMEOUT))]
    while seen[-1]["session"]["input_tokens"] != 10:
        seen.append(json.loads(await mine.receive_from(TIMEOUT)))
    assert {f["type"] for f in seen} == {"session"}
    assert seen[0]["session"]["status"] == "running" and seen[0]["session"]["title"] == "Fix it"
    last = seen[-1]["session"]
    assert (last["id"], last["status"], last["cost_usd"], last["output_tokens"]) == (
        session.pk,
        "running",
        "0.500000",
        2,
    )
    assert last["updated"].endswith("Z")

    # The outsider hears about their own session, never about ours.
    await asyncio.to_thread(_in_thread, emit, theirs.pk, "status", {"status": "cancelled"})
    frame = json.loads(await others.receive_from(TIMEOUT))
    assert frame["session"]["id"] == theirs.pk
    await mine.disconnect()
    await others.disconnect()


async def test_it_shows_staff_every_team_on_the_session_list(session):
    admin = await sync_to_async(get_user_model().objects.create_user)(
        "admin", "a@example.com", "pw", is_staff=True
    )
    comm = await connect("/ws/sessions/", admin)
    await asyncio.to_thread(_in_thread, emit, session.pk, "status", {"status": "failed"})
    frame = json.loads(await comm.receive_from(TIMEOUT))
    assert frame["session"]["id"] == session.pk
    await comm.disconnect()


async def test_it_keeps_the_teams_apart_on_the_session_list(owner, other_team):
    team = await sync_to_async(Team.objects.get)(slug="alpha")
    assert team is not None
    comm = await connect("/ws/sessions/", owner)
    repo = await sync_to_async(Repository.objects.create)(team=other_team, name="x", url="/tmp/x")
    foreign = await sync_to_async(Session.objects.create)(
        team=other_team, repository=repo, base_branch="main", model="m"
    )
    own_repo = await sync_to_async(Repository.objects.create)(team=team, name="y", url="/tmp/y")
    own = await sync_to_async(Session.objects.create)(
        team=team, repository=own_repo, base_branch="main", model="m"
    )
    await asyncio.to_thread(_in_thread, emit, foreign.pk, "status", {"status": "running"})
    await asyncio.to_thread(_in_thread, emit, own.pk, "status", {"status": "running"})
    frame = json.loads(await comm.receive_from(TIMEOUT))
    assert frame["session"]["id"] == own.pk  # the foreign change, sent first, never arrived
    await comm.disconnect()

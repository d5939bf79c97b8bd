"""Websockets with a bearer token: API clients and the CLI stream like the pages do, scoped alike."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from deputies.asgi import application
from deputies.routing import websocket_urlpatterns
from sessions.models import APIToken, Repository, Session
from sessions.streaming.wire import WebsocketAuth
from tests.test_consumers import TIMEOUT, close_code, emit_elsewhere, frames, seqs

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

from tests.test_consumers import default_backend, stop_hub  # noqa: E402, F401 - autouse fixtures


@pytest.fixture
def session(team) -> Session:
    repo = Repository.objects.create(team=team, name="r", url="/tmp/none", provider="local")
    return Session.objects.create(team=team, repository=repo, base_branch="main", model="scripted/demo")


def with_token(path: str, secret: str, app=application, origin: bytes | None = None) -> WebsocketCommunicator:
    headers = [(b"host", b"testserver"), (b"authorization", f"Bearer {secret}".encode())]
    if origin is not None:
        headers.append((b"origin", origin))
    return WebsocketCommunicator(app, path, headers=headers)


async def issue(user) -> str:
    return (await sync_to_async(APIToken.issue)(user, "ws"))[1]


async def test_it_streams_a_session_to_a_team_members_token(session, owner):
    await emit_elsewhere(session.pk, 3)
    comm = with_token(f"/ws/sessions/{session.pk}/", await issue(owner))
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    assert await seqs(comm, 3) == [1, 2, 3]
    await emit_elsewhere(session.pk, 1)
    assert await seqs(comm, 1) == [4]
    await comm.disconnect()


async def test_it_answers_an_outsiders_token_as_if_the_session_did_not_exist(session, outsider):
    secret = await issue(outsider)
    assert await close_code(with_token(f"/ws/sessions/{session.pk}/", secret)) == 4404


async def test_it_closes_a_socket_with_a_bad_token_with_4401(session, owner):
    secret = await issue(owner)
    for bad in ("dep_" + "x" * 43, secret + "x", ""):
        assert await close_code(with_token(f"/ws/sessions/{session.pk}/", bad)) == 4401
    assert await close_code(with_token("/ws/sessions/", "nope")) == 4401


async def test_it_refuses_the_token_of_a_deactivated_user(session, owner):
    secret = await issue(owner)
    owner.is_active = False
    await sync_to_async(owner.save)()
    assert await close_code(with_token(f"/ws/sessions/{session.pk}/", secret)) == 4401


async def test_it_keeps_the_teams_apart_on_the_session_list_for_tokens(session, owner, outsider, other_team):
    repo = await sync_to_async(Repository.objects.create)(team=other_team, name="x", url="/tmp/x")
    theirs = await sync_to_async(Session.objects.create)(
        team=other_team, repository=repo, base_branch="main", model="m"
    )
    mine, others = (
        with_token("/ws/sessions/", await issue(owner)),
        with_token("/ws/sessions/", await issue(outsider)),
    )
    assert (await mine.connect(timeout=TIMEOUT))[0] and (await others.connect(timeout=TIMEOUT))[0]
    await emit_elsewhere(session.pk, 1, type="status", status="running")
    await emit_elsewhere(theirs.pk, 1, type="status", status="running")
    assert [f["session"]["id"] for f in await frames(mine, 1)] == [session.pk]
    assert [f["session"]["id"] for f in await frames(others, 1)] == [
        theirs.pk
    ]  # ours, sent first, never came
    await mine.disconnect()
    await others.disconnect()


async def test_it_needs_no_origin_with_a_token_but_still_checks_the_cookies_origin(session, owner, settings):
    settings.ALLOWED_HOSTS = ["testserver"]
    app = WebsocketAuth(URLRouter(websocket_urlpatterns))  # reads ALLOWED_HOSTS when made
    secret = await issue(owner)
    # A CLI sends no Origin, a script may send any: the token is what authenticates.
    for origin in (None, b"http://elsewhere.example"):
        comm = with_token(f"/ws/sessions/{session.pk}/", secret, app=app, origin=origin)
        assert (await comm.connect(timeout=TIMEOUT))[0]
        await comm.disconnect()
    cookie_from_elsewhere = WebsocketCommunicator(
        app, f"/ws/sessions/{session.pk}/", headers=[(b"origin", b"http://evil.example")]
    )
    assert not (await cookie_from_elsewhere.connect(timeout=TIMEOUT))[0]

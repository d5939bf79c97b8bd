"""A websocket killed and reopened mid-run still shows exactly the database's timeline.

Real processes: daphne (``deputies web``), a worker running the agent against the scripted
LLM, and a real websocket client, over Postgres LISTEN/NOTIFY and over Redis pub/sub. (Polling, the
SQLite path, is covered in test_consumers.py; each run here costs the worker's slow shutdown.)
"""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest
from django.conf import settings as django_settings
from django.test import Client
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from sessions.agent.fake_llm import start_in_thread
from sessions.models import APIToken, Event, Repository, Session
from tests.live import ROOT, child_env, wait_for, web_process, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCRIPT = json.loads((ROOT / "deputies" / "demo" / "script.json").read_text())
REDIS_URL = os.environ.get("DEPUTIES_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TERMINAL = {"completed", "failed", "cancelled"}


def open_stream(base: str, session_id: int, cookie: str, after: int = 0) -> ClientConnection:
    url = base.replace("http://", "ws://") + f"/ws/sessions/{session_id}/?after={after}"
    return ws_connect(
        url,
        additional_headers={"Cookie": f"{django_settings.SESSION_COOKIE_NAME}={cookie}", "Origin": base},
        open_timeout=10,
    )


def next_event(ws: ClientConnection) -> dict:
    frame = json.loads(ws.recv(timeout=30))
    assert frame["type"] == "event", frame
    return frame["event"]


def redis_or_skip() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs Redis at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis does not answer at {REDIS_URL}")


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_it_shows_the_database_timeline_across_a_websocket_killed_mid_run(
    backend, settings, tmp_path, team, owner, sample_repo
):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("daphne, the worker and the test share the database: needs Postgres")
    extra = {"DEPUTIES_STREAM_BACKEND": backend}
    if backend == "redis":
        redis_or_skip()
        extra["DEPUTIES_REDIS_URL"] = REDIS_URL
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    _, token = APIToken.issue(owner, "e2e")
    browser = Client()
    browser.force_login(owner)
    cookie = browser.cookies[django_settings.SESSION_COOKIE_NAME].value
    # The demo script with "model latency", so the run lasts a second or two.
    script = {"responses": [{**r, "delay": 0.2} for r in SCRIPT["responses"][:6]]}

    with start_in_thread(script) as fake:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="k",
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
            **extra,
        )
        with worker_process(env), web_process(env) as base:
            created = httpx.post(
                f"{base}/api/v1/sessions",
                json={
                    "repository": repository.pk,
                    "prompt": "Make the failing test pass",
                    "model": "scripted/demo",
                },
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert created.status_code == 201, created.text
            session_id = created.json()["id"]

            # First connection: read until the agent is at work, then drop the TCP connection
            # without a closing handshake, as a lost network would.
            received: list[dict] = []
            with open_stream(base, session_id, cookie) as ws:
                while not received or received[-1]["type"] != "tool_started":
                    received.append(next_event(ws))
                ws.socket.shutdown(socket.SHUT_RDWR)
            first = len(received)

            # Events keep being written while nobody listens.
            wait_for(
                lambda: Session.objects.get(pk=session_id).last_seq > received[-1]["seq"] + 2,
                timeout=30,
                what="events written while disconnected",
            )
            assert Session.objects.get(pk=session_id).status == "running"

            with open_stream(base, session_id, cookie, after=received[-1]["seq"]) as ws:
                while not (
                    received[-1]["type"] == "status" and received[-1]["payload"]["status"] in TERMINAL
                ):
                    received.append(next_event(ws))
                # Nothing more is pending: a ping is answered before any further frame.
                ws.send(json.dumps({"type": "ping"}))
                assert json.loads(ws.recv(timeout=10)) == {"type": "pong"}

            session = Session.objects.get(pk=session_id)
            assert session.status == "completed", (data_dir / "worker.log").read_text()[-3000:]
            stored = list(Event.objects.filter(session_id=session_id).order_by("seq"))
            assert (
                [e["seq"] for e in received]
                == [e.seq for e in stored]
                == list(range(1, session.last_seq + 1))
            )
            assert [(e["type"], e["payload"], e["run"]) for e in received] == [
                (e.type, e.payload, e.run_id) for e in stored
            ]
            assert 0 < first < len(received)
            assert "run_completed" in [e["type"] for e in received[first:]]

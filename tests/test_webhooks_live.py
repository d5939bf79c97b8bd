"""Webhooks against real processes on Postgres: ``deputies web`` (daphne) taking concurrent requests,
and the whole path with a ``deputies worker``, the scripted model and a loopback callback receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from django.db import connection
from django_q.models import OrmQ

from integrations.webhooks.models import WebhookSource, sign
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Message, Repository, Run, Session, SessionBinding
from tests.live import ROOT, child_env, free_port, wait_for, web_process, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCRIPT = json.loads((ROOT / "deputies" / "demo" / "script.json").read_text())
CONCURRENT = 20


@pytest.fixture(autouse=True)
def postgres_only():
    if connection.vendor != "postgresql":
        pytest.skip("the web process, the worker and the test share the database: needs Postgres")


def new_source(team, repository, auth: str) -> tuple[WebhookSource, dict[str, str]]:
    source = WebhookSource(
        team=team, name=f"live-{auth}", slug=f"live-{auth}", auth=auth, repository=repository
    )
    shown = source.issue_credentials()
    source.save()
    return source, shown


def all_at_once(send, count: int = CONCURRENT) -> list[httpx.Response]:
    """``count`` requests released together by a barrier, each on its own connection."""
    barrier = threading.Barrier(count)

    def one(n: int) -> httpx.Response:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            return send(client, n)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_it_makes_exactly_one_session_for_concurrent_requests_with_one_dedupe_key(
    tmp_path, team, sample_repo
):
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    source, shown = new_source(team, repository, "token")
    env = child_env(
        tmp_path,
        DEPUTIES_LLM_PROVIDERS="scripted",
        DEPUTIES_LLM_SCRIPTED_BASE_URL="http://127.0.0.1:9/v1",
        DEPUTIES_DEFAULT_MODEL="scripted/demo",
    )
    headers = {"Authorization": f"Bearer {shown['token']}"}
    with web_process(env, free_port()) as base:
        url = f"{base}/integrations/webhooks/{source.slug}"
        same = {"prompt": "Build 77 failed: fix it", "dedupe_key": "build-77"}
        answers = all_at_once(lambda client, n: client.post(url, json=same, headers=headers))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * (CONCURRENT - 1) + [202], [r.text for r in answers]
        assert len({r.json()["session"] for r in answers}) == 1
        assert Session.objects.count() == 1 and Run.objects.count() == 1 and OrmQ.objects.count() == 1

        # One thread, twenty first messages at once: one session, bound once, every message kept.
        answers = all_at_once(
            lambda client, n: client.post(
                url, json={"prompt": f"Note {n}", "thread_id": "incident-9"}, headers=headers
            )
        )
        assert [r.status_code for r in answers] == [202] * CONCURRENT, [r.text for r in answers]
        sessions = {r.json()["session"] for r in answers}
        assert len(sessions) == 1
        thread_session = Session.objects.get(pk=sessions.pop())
        assert sum(r.json()["created"] for r in answers) == 1
        assert SessionBinding.objects.get().session == thread_session
        contents = sorted(Message.objects.filter(session=thread_session).values_list("content", flat=True))
        assert contents == sorted(f"Note {n}" for n in range(CONCURRENT))
        assert sorted(
            Message.objects.filter(session=thread_session).values_list("position", flat=True)
        ) == list(range(1, CONCURRENT + 1))
        assert Session.objects.count() == 2


class Receiver:
    """A loopback HTTP endpoint that records every callback and answers 200."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/deputies-callback"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, header: str, body: bytes) -> bool:
    """The receiver's side of the README recipe: ``t=<unix>,v1=<hex HMAC-SHA256 of "t.body">``."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300


def test_it_runs_a_signed_webhook_to_a_finished_session_and_calls_back(tmp_path, team, sample_repo):
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    source, shown = new_source(team, repository, "hmac")
    with start_in_thread(SCRIPT) as fake, Receiver() as receiver:
        env = child_env(
            tmp_path,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="sk-test-secret-value",
            DEPUTIES_DEFAULT_MODEL="scripted/demo",
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
            DEPUTIES_SANDBOX_ISOLATION="none",
            DEPUTIES_CALLBACK_ALLOWED_NETWORKS="127.0.0.1/32",
        )
        with web_process(env, free_port()) as base, worker_process(env):
            raw = json.dumps(
                {
                    "prompt": "Make the failing test pass",
                    "thread_id": "pr-5",
                    "callback_url": receiver.url,
                    "metadata": {"ticket": "OPS-1"},
                }
            ).encode()
            ts = int(time.time())
            answer = httpx.post(
                f"{base}/integrations/webhooks/{source.slug}",
                content=raw,
                headers={
                    "Content-Type": "application/json",
                    "X-Deputies-Timestamp": str(ts),
                    "X-Deputies-Signature": sign(shown["signing_secret"], ts, raw),
                },
                timeout=30,
            )
            assert answer.status_code == 202, answer.text
            session_id = answer.json()["session"]

            def finished() -> Session | None:
                session = Session.objects.get(pk=session_id)
                return session if session.status in ("completed", "failed") else None

            session = wait_for(finished, timeout=90, interval=0.2, what="the session to finish")
            assert session.status == "completed", session.error
            assert session.source == "webhook" and session.thread_label == "live-hmac: pr-5"
            headers, body = wait_for(lambda: receiver.received, timeout=60, what="the callback")[0]
    assert verify(shown["callback_secret"], headers["X-Deputies-Signature"], body)
    payload = json.loads(body)
    assert payload["event"] == "run.completed"
    assert payload["session"]["id"] == session_id
    assert payload["session"]["external_ref"]["metadata"] == {"ticket": "OPS-1"}
    assert headers["X-Deputies-Delivery"]

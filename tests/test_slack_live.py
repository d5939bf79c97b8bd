"""Slack end to end on real parts: ``deputies web`` (signed HTTP requests), ``deputies worker`` (the runs,
the deliveries, Socket Mode), the scripted model (``sessions/agent/fake_llm.py``) and the loopback
Slack of tests/slack_fake.py that the real slack-sdk clients talk to. Nothing is patched."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlencode

import httpx
import pytest
from django.db import connection

from integrations.deliveries.models import Delivery
from integrations.slack import messages
from integrations.slack.models import SlackChannel, SlackThread, SlackUser, SlackWorkspace
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Message, Repository, Session
from tests.live import ROOT, child_env, free_port, wait_for, web_process, worker_process
from tests.slack_fake import (
    APP_TOKEN,
    BOT_TOKEN,
    BOT_USER,
    CHANNEL_ID,
    SIGNING_SECRET,
    TEAM_ID,
    FakeSlack,
    FakeSocketMode,
    action_payload,
    command_form,
    event_body,
    signed,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCRIPT = json.loads((ROOT / "deputies" / "demo" / "script.json").read_text())
HOLD = "[hold]"


@pytest.fixture(autouse=True)
def postgres_only():
    if connection.vendor != "postgresql":
        pytest.skip("the web process, the worker and the test share the database: needs Postgres")


class Gate:
    """Holds the second model call of a ``[hold]`` conversation until ``release``: the run is active
    for as long as the test needs (to send a follow-up into it, or to cancel it)."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, body: dict) -> None:
        msgs = body.get("messages", [])
        users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        answered = sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "assistant")
        if answered == 1 and users and HOLD in str(users[0].get("content")):
            self.holding.set()
            self.release.wait(60)


@pytest.fixture
def setup(team, owner, sample_repo):
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    workspace = SlackWorkspace.objects.create(slack_team_id=TEAM_ID, name="Test", team=team)
    SlackChannel.objects.create(team=team, name="#dev", workspace=workspace, channel_id=CHANNEL_ID,
                                repository=repository)  # fmt: skip
    return workspace


def slack_env(tmp_path, fake_llm, slack: FakeSlack, **extra: str) -> dict[str, str]:
    settings = {"DEPUTIES_SLACK_SIGNING_SECRET": SIGNING_SECRET, **extra}
    return child_env(
        tmp_path,
        DEPUTIES_LLM_PROVIDERS="scripted",
        DEPUTIES_LLM_SCRIPTED_BASE_URL=fake_llm.base_url,
        DEPUTIES_LLM_SCRIPTED_API_KEY="sk-test",
        DEPUTIES_DEFAULT_MODEL="scripted/demo",
        DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
        DEPUTIES_SANDBOX_ISOLATION="none",
        DEPUTIES_BASE_URL="https://deputies.example.test",
        DEPUTIES_SLACK_BOT_TOKEN=BOT_TOKEN,
        DEPUTIES_SLACK_API_URL=slack.url,
        DEPUTIES_SLACK_STATUS_INTERVAL="0.2",
        DEPUTIES_DELIVERY_BACKOFF_BASE="0.1",
        DEPUTIES_DELIVERY_BACKOFF_MAX="0.5",
        **settings,
    )


def post(
    client: httpx.Client, base: str, path: str, body: bytes, content_type: str, **headers
) -> httpx.Response:
    return client.post(f"{base}/integrations/slack/{path}", content=body,
                       headers={"Content-Type": content_type, **signed(body), **headers})  # fmt: skip


def finished(session_id: int, runs: int = 1):
    def check() -> Session | None:
        session = Session.objects.get(pk=session_id)
        done = session.runs.exclude(status__in=("queued", "running")).count()
        return session if done >= runs and session.status not in ("queued", "running") else None

    return check


def test_it_runs_a_slash_command_with_a_follow_up_and_cancels_a_mention_over_http(tmp_path, setup, owner):
    gate = Gate()
    with FakeSlack() as slack, start_in_thread(SCRIPT) as fake_llm:
        fake_llm.on_request = gate
        slack.add_user("U0ALICE", "owner@example.com")
        env = slack_env(tmp_path, fake_llm, slack)
        with web_process(env, free_port()) as base, worker_process(env), httpx.Client(timeout=30) as http:
            # /deputy: acknowledged well within Slack's 3 s, ephemerally, with the dashboard link.
            body = urlencode(command_form(f"Make the failing test pass {HOLD}")).encode()
            started = time.monotonic()
            answer = post(http, base, "commands", body, "application/x-www-form-urlencoded")
            took = time.monotonic() - started
            assert answer.status_code == 200, answer.text
            assert took < 3.0
            session = Session.objects.get()
            assert answer.json()["response_type"] == "ephemeral"
            assert f"https://deputies.example.test/sessions/{session.pk}" in answer.json()["text"]

            # The run holds at its second model call: reply in the thread meanwhile.
            assert gate.holding.wait(60), "the run never reached the model"
            thread = wait_for(lambda: SlackThread.objects.exclude(thread_ts="").filter(session=session).first(),
                              what="the thread's first message")  # fmt: skip
            reply = event_body({"type": "message", "user": "U0ALICE", "text": "Also add a docstring",
                                "ts": "1700000999.000001", "thread_ts": thread.thread_ts})  # fmt: skip
            raw = json.dumps(reply).encode()
            assert post(http, base, "events", raw, "application/json").status_code == 200
            follow_up = Message.objects.get(session=session, position=2)
            assert follow_up.status == "pending"  # queued behind the active run
            # Slack retries the same event: no second follow-up.
            again = post(http, base, "events", raw, "application/json", **{"X-Slack-Retry-Num": "1"})
            assert again.status_code == 200 and Message.objects.filter(session=session).count() == 2
            gate.release.set()

            session = wait_for(finished(session.pk, runs=2), timeout=120, interval=0.2, what="both runs")
            assert session.status in ("idle", "completed"), session.error
            assert session.runs.count() == 2
            wait_for(lambda: len([t for t in slack.texts() if t.startswith("Done")]) == 2, timeout=60,
                     what="two end messages")  # fmt: skip

            # Reactions: eyes on receipt, the hourglass while running, the check at the end.
            reactions = slack.reactions()
            assert reactions[0] in ("+eyes", "+hourglass_flowing_sand") and "+eyes" in reactions
            assert reactions.index("+hourglass_flowing_sand") < reactions.index("-hourglass_flowing_sand")
            assert reactions.index("+hourglass_flowing_sand") < reactions.index("+white_check_mark")
            assert {p["timestamp"] for m, p in slack.of("reactions.add") if p["name"] == "eyes"} == {
                thread.thread_ts, "1700000999.000001",
            }  # fmt: skip
            # One status message, edited as the plan advanced, ending done.
            thread.refresh_from_db()
            updates = [p for _, p in slack.of("chat.update")]
            assert updates and {p["ts"] for p in updates} == {thread.status_ts}
            assert any("(1/3)" in p["text"] or "(2/3)" in p["text"] or "(0/3)" in p["text"] for p in updates)
            wait_for(lambda: slack.of("chat.update")[-1][1]["text"].startswith(":white_check_mark: Done"),
                     what="the last edit to say done")  # fmt: skip
            # The end messages: summary, diff stats, cost, the dashboard link, in the thread.
            ends = [p for _, p in slack.of("chat.postMessage") if p["text"].startswith("Done")]
            assert all(p["thread_ts"] == thread.thread_ts for p in ends)
            shown = json.dumps(ends[0]["blocks"])
            assert "calc.py" in shown and "Cost $" in shown
            assert f"https://deputies.example.test/sessions/{session.pk}" in shown
            assert slack.texts()[0].startswith("<@U0ALICE> asked Deputies")

            # A mention starts another session; its Cancel button cancels the run.
            gate.holding.clear()
            gate.release.clear()
            mention = event_body({"type": "app_mention", "user": "U0ALICE", "ts": "1700002000.000001",
                                  "text": f"<@{BOT_USER}> Refactor everything {HOLD}"})  # fmt: skip
            assert (
                post(http, base, "events", json.dumps(mention).encode(), "application/json").status_code
                == 200
            )
            second = Session.objects.exclude(pk=session.pk).get()
            assert gate.holding.wait(60)
            click = urlencode({"payload": json.dumps(action_payload(messages.CANCEL, second.pk))}).encode()
            assert (
                post(http, base, "interactive", click, "application/x-www-form-urlencoded").status_code == 200
            )
            second.refresh_from_db()
            assert second.status == "cancelled"
            gate.release.set()
            wait_for(lambda: any(t.startswith("Cancelled") for t in slack.texts()), timeout=30,
                     what="the cancelled message")  # fmt: skip
            wait_for(lambda: "+x" in slack.reactions(), what="the x reaction")
            assert Session.objects.count() == 2
            assert not Delivery.objects.filter(kind="slack", status="failed").exists()


def test_it_takes_a_slash_command_and_retried_events_over_socket_mode(tmp_path, setup):
    with FakeSlack() as slack, start_in_thread(SCRIPT) as fake_llm:
        sockets = FakeSocketMode(slack)
        slack.add_user("U0ALICE", "owner@example.com")
        env = slack_env(tmp_path, fake_llm, slack, DEPUTIES_SLACK_APP_TOKEN=APP_TOKEN,
                        DEPUTIES_SLACK_SIGNING_SECRET="")  # fmt: skip
        slack.down = True  # the worker starts while Slack is away: it keeps trying
        with worker_process(env):
            wait_for(lambda: slack.attempts >= 2, timeout=60, what="two connection attempts")
            slack.down = False
            sockets.wait_connected(timeout=60)
            assert slack.of("apps.connections.open")
            assert f"Bearer {APP_TOKEN}" in slack.tokens
            started = time.monotonic()
            envelope = sockets.push("slash_commands", command_form("Make the failing test pass"))
            ack = sockets.ack_for(envelope)
            assert time.monotonic() - started < 3.0
            session = Session.objects.get()
            assert ack["payload"]["response_type"] == "ephemeral"
            assert f"/sessions/{session.pk}" in ack["payload"]["text"]

            # An event and Slack's retry of it: one session, both acknowledged.
            event = event_body({"type": "app_mention", "user": "U0ALICE", "ts": "1700003000.000001",
                                "text": f"<@{BOT_USER}> Tidy the README"}, event_id="Ev0SOCKET")  # fmt: skip
            first = sockets.push("events_api", event)
            retry = sockets.push("events_api", event, retry_attempt=1)
            assert sockets.ack_for(first) and sockets.ack_for(retry)
            assert Session.objects.count() == 2

            wait_for(finished(session.pk), timeout=120, interval=0.2, what="the session")
            wait_for(lambda: len([t for t in slack.texts() if t.startswith("Done")]) >= 1, timeout=60,
                     what="the end message")  # fmt: skip
            assert "+white_check_mark" in wait_for(
                lambda: "+white_check_mark" in slack.reactions() and slack.reactions(), what="the check"
            )


def test_it_finishes_while_slack_is_down_and_delivers_everything_after(tmp_path, setup, owner):
    SlackUser.objects.create(workspace=setup, slack_user_id="U0ALICE", user=owner, via="admin")
    with FakeSlack() as slack, start_in_thread(SCRIPT) as fake_llm:
        env = slack_env(tmp_path, fake_llm, slack, DEPUTIES_SLACK_DELIVERY_MAX_ATTEMPTS="1000")
        slack.down = True
        with web_process(env, free_port()) as base, worker_process(env), httpx.Client(timeout=30) as http:
            mention = event_body({"type": "app_mention", "user": "U0ALICE", "ts": "1700004000.000001",
                                  "text": f"<@{BOT_USER}> Make the failing test pass"})  # fmt: skip
            assert (
                post(http, base, "events", json.dumps(mention).encode(), "application/json").status_code
                == 200
            )
            session = wait_for(
                finished(Session.objects.get().pk), timeout=120, interval=0.2, what="the session"
            )
            assert session.status in ("idle", "completed"), session.error
            assert slack.calls == [] and slack.attempts > 0  # every attempt so far got a 500
            assert not Delivery.objects.filter(kind="slack", status="delivered").exists()
            slack.down = False
            wait_for(
                lambda: any(t.startswith("Done") for t in slack.texts()), timeout=60, what="the end message"
            )
            wait_for(lambda: "+white_check_mark" in slack.reactions(), timeout=30, what="the check")
            wait_for(lambda: not Delivery.objects.filter(kind="slack", status="pending").exists(), timeout=30,
                     what="every delivery sent")  # fmt: skip
            assert not Delivery.objects.filter(kind="slack", status="failed").exists()
            assert "+eyes" in slack.reactions() and len(slack.of("chat.postMessage")) == 2  # status + end


def test_it_runs_socket_mode_alone_as_deputies_slack(tmp_path, setup):
    """``deputies slack``: the Socket Mode process for installs whose workers should not hold it."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.live import stop_process

    with FakeSlack() as slack, start_in_thread(SCRIPT) as fake_llm:
        sockets = FakeSocketMode(slack)
        slack.add_user("U0ALICE", "owner@example.com")
        env = slack_env(tmp_path, fake_llm, slack, DEPUTIES_SLACK_APP_TOKEN=APP_TOKEN,
                        DEPUTIES_SLACK_SOCKET_MODE_IN_WORKER="false")  # fmt: skip
        log = open(tmp_path / "slack.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([str(Path(sys.executable).parent / "deputies"), "slack"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            sockets.wait_connected(timeout=60)
            ack = sockets.ack_for(sockets.push("slash_commands", command_form("Make the failing test pass")))
            assert ack["payload"]["text"].startswith(":inbox_tray: Queued")
            assert Session.objects.get().status == "queued"  # no worker here: the run waits for one
        finally:
            stop_process(proc)
            log.close()
        assert proc.returncode == 0, (tmp_path / "slack.log").read_text()[-2000:]


def test_it_makes_one_session_for_twenty_copies_of_an_event_at_once(tmp_path, setup):
    """Slack's retries can overlap the first delivery: the dedupe claim, the last statement of each
    request's transaction, lets exactly one through; the others roll back and answer 200."""
    from tests.test_webhooks_live import all_at_once

    with FakeSlack() as slack, start_in_thread(SCRIPT) as fake_llm:
        slack.add_user("U0ALICE", "owner@example.com")
        env = slack_env(tmp_path, fake_llm, slack)
        with web_process(env, free_port()) as base:
            event = event_body({"type": "app_mention", "user": "U0ALICE", "ts": "1700005000.000001",
                                "text": f"<@{BOT_USER}> Fix the flaky test"}, event_id="Ev0TWENTY")  # fmt: skip
            raw = json.dumps(event).encode()
            answers = all_at_once(
                lambda client, n: post(
                    client,
                    base,
                    "events",
                    raw,
                    "application/json",
                    **({"X-Slack-Retry-Num": str(n)} if n else {}),
                )  # fmt: skip
            )
            assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
            assert Session.objects.count() == 1
            session = Session.objects.get()
            assert session.messages.count() == 1 and SlackThread.objects.count() == 1
            assert Delivery.objects.filter(kind="slack").count() == 2  # eyes, status message

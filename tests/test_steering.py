"""Steering a running agent, and editing or cancelling pending follow-ups (issue 13, item 1)."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sessions.agent.fake_llm import start_in_thread
from sessions.models import Event, Message, Run, Session, SessionStatus, start_session
from tests.conftest import client_for
from tests.live import child_env, wait_for, worker_process

SESSIONS = "/api/v1/sessions"


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }


@pytest.fixture
def session(team, owner, repository) -> Session:
    return start_session(team=team, repository=repository, prompt="Fix the bug", model="scripted/demo",
                         created_by=owner)  # fmt: skip


@pytest.fixture
def running(session) -> Run:
    run = session.runs.get()
    assert run.claim("test")
    return run


def messages_url(session, message_id=None) -> str:
    return f"{SESSIONS}/{session.pk}/messages" + (f"/{message_id}" if message_id else "")


@pytest.mark.django_db
def test_it_counts_a_steer_message_on_the_running_run_and_the_heartbeat_reads_it_back(running, owner):
    session = running.session
    with CaptureQueriesContext(connection) as queries:
        assert running.beat()
    assert len(queries) == 1 and running.steers == 0  # the heartbeat is the only statement of a step

    reply = client_for(owner).post(
        messages_url(session), {"content": "Use tabs", "steer": True}, format="json"
    )
    assert reply.status_code == 201, reply.content
    assert reply.json()["steer"] is True and reply.json()["status"] == "pending"
    plain = client_for(owner).post(messages_url(session), {"content": "Later"}, format="json")
    assert plain.json()["steer"] is False and plain.json()["queued_behind_active_run"] is True

    with CaptureQueriesContext(connection) as queries:
        assert running.beat()
    assert len(queries) == 1 and running.steers == 1


@pytest.mark.django_db
def test_it_injects_only_steer_messages_into_the_running_conversation_once(running, owner):
    from sessions.steering import take_steers

    session = running.session
    session.add_message("plain follow-up", author=owner)
    steer = session.add_message("steer now", author=owner, steer=True)
    transcript: list[dict] = []
    assert [m.pk for m in take_steers(running, transcript)] == [steer.pk]
    assert transcript == [{"role": "user", "content": "steer now"}]
    assert take_steers(running, transcript) == [] and len(transcript) == 1
    steer.refresh_from_db()
    assert (steer.status, steer.run_id) == (Message.Status.CLAIMED, running.pk)
    assert Message.objects.get(content="plain follow-up").status == Message.Status.PENDING
    injected = Event.objects.get(session=session, type="message_injected")
    assert injected.payload["message_id"] == steer.pk and injected.run_id == running.pk


@pytest.mark.django_db
def test_it_starts_a_run_for_a_steer_message_when_none_is_active(session, owner):
    run = session.runs.get()
    assert run.claim("test") and run.finish(Run.Status.COMPLETED)
    session.add_message("steer with nothing running", author=owner, steer=True)
    queued = session.runs.get(status=Run.Status.QUEUED)
    assert queued.attempt == 2 and queued.steers == 0


@pytest.mark.django_db
def test_it_edits_and_cancels_a_pending_follow_up_until_a_run_picks_it(running, owner):
    session = running.session
    api = client_for(owner)
    message_id = api.post(messages_url(session), {"content": "first draft"}, format="json").json()["id"]

    edited = api.patch(messages_url(session, message_id), {"content": "second draft"}, format="json")
    assert edited.status_code == 200, edited.content
    assert edited.json()["content"] == "second draft"
    assert Message.objects.get(pk=message_id).content == "second draft"
    assert Event.objects.filter(session=session, type="message_edited").count() == 1

    empty = api.patch(messages_url(session, message_id), {"content": "  "}, format="json")
    assert empty.status_code == 400 and "content" in empty.json()["errors"]

    listed = api.get(messages_url(session)).json()["results"]
    assert [(m["position"], m["status"]) for m in listed] == [(1, "claimed"), (2, "pending")]

    cancelled = api.delete(messages_url(session, message_id))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = api.delete(messages_url(session, message_id))
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    assert api.patch(messages_url(session, message_id), {"content": "x"}, format="json").status_code == 409

    prompt = session.messages.get(position=1)  # claimed by the run
    assert api.patch(messages_url(session, prompt.pk), {"content": "x"}, format="json").status_code == 409
    assert api.delete(messages_url(session, 999999)).status_code == 404
    # The run goes on, and finishing it starts nothing for the cancelled follow-up.
    assert running.finish(Run.Status.COMPLETED)
    assert not session.runs.filter(status__in=Run.ACTIVE).exists()


@pytest.mark.django_db
def test_it_cancels_a_queued_follow_up_run_whose_only_message_is_withdrawn(session, owner):
    run = session.runs.get()
    assert run.claim("test") and run.finish(Run.Status.COMPLETED)
    message = session.add_message("one more thing", author=owner)
    follow_up_run = session.runs.get(status=Run.Status.QUEUED)
    reply = client_for(owner).delete(messages_url(session, message.pk))
    assert reply.status_code == 200
    follow_up_run.refresh_from_db()
    session.refresh_from_db()
    assert follow_up_run.status == Run.Status.CANCELLED
    assert session.status == SessionStatus.COMPLETED


@pytest.mark.django_db
def test_it_lets_only_writers_of_the_team_change_a_pending_follow_up(running, owner, viewer, outsider):
    session = running.session
    message = session.add_message("pending", author=owner)
    url = messages_url(session, message.pk)
    assert client_for(viewer).patch(url, {"content": "x"}, format="json").status_code == 403
    assert client_for(viewer).delete(url).status_code == 403
    assert client_for(outsider).delete(url).status_code == 404
    assert client_for(None).delete(url).status_code in (401, 403)
    assert Message.objects.get(pk=message.pk).status == Message.Status.PENDING


@pytest.mark.django_db
def test_it_shows_steer_and_pending_follow_ups_with_their_actions_on_the_session_page(running, owner, client):
    session = running.session
    session.add_message("steer it", author=owner, steer=True)
    pending = session.add_message("queued one", author=owner)
    client.force_login(owner)
    page = client.get(f"/sessions/{session.pk}").content.decode()
    assert "Steer" in page and 'name="steer"' in page
    assert f"/sessions/{session.pk}/messages/{pending.pk}" in page
    changed = client.post(f"/sessions/{session.pk}/messages/{pending.pk}", {"content": "queued, edited"})
    assert changed.status_code == 302
    assert Message.objects.get(pk=pending.pk).content == "queued, edited"
    client.post(f"/sessions/{session.pk}/messages/{pending.pk}", {"cancel": "1"})
    assert Message.objects.get(pk=pending.pk).status == Message.Status.CANCELLED
    sent = client.post(f"/sessions/{session.pk}/messages", {"content": "steer by form", "steer": "1"})
    assert sent.status_code == 302
    assert Message.objects.get(content="steer by form").steer is True


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_it_delivers_a_steer_message_sent_during_a_slow_tool_call_to_the_very_next_model_request(
    settings, tmp_path, team, owner, repository
):
    """A real worker; the scripted model over HTTP records each request. The tool call waits for a
    file the test writes once both messages are sent, so nothing depends on timing."""
    gate = tmp_path / "gate"
    script = {
        "responses": [
            {"tool_calls": [{"name": "bash", "arguments": {"command": f"while [ ! -e {gate} ]; do sleep 0.02; done; echo slow done"}}]},
            {"content": "Done, README updated as asked."},
            {"content": "Changelog added."},
        ]
    }  # fmt: skip
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"
    with start_in_thread(script) as fake:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
            DEPUTIES_SANDBOX_ISOLATION="none",
        )
        with worker_process(env):
            session = start_session(team=team, repository=repository, prompt="Fix the bug",
                                    model="scripted/demo", created_by=owner)  # fmt: skip
            wait_for(
                lambda: Event.objects.filter(session=session, type="tool_started").exists(),
                timeout=60,
                what="the slow tool call",
            )
            api = client_for(owner)
            steer = api.post(messages_url(session), {"content": "STEER: also update the README", "steer": True},
                             format="json")  # fmt: skip
            plain = api.post(messages_url(session), {"content": "PLAIN: then add a changelog"}, format="json")
            assert steer.status_code == plain.status_code == 201
            gate.touch()
            wait_for(
                lambda: Run.objects.filter(session=session, status=Run.Status.COMPLETED).count() == 2,
                timeout=60,
                what="both runs to complete",
            )
    chats = [r["body"] for r in fake.requests if r["path"].endswith("/chat/completions")]
    assert len(chats) == 3
    # The request right after the slow tool: its result, then the steer message; no plain follow-up.
    after_tool = chats[1]["messages"]
    assert after_tool[-2]["role"] == "tool" and "slow done" in after_tool[-2]["content"]
    assert after_tool[-1] == {"role": "user", "content": "STEER: also update the README"}
    assert "PLAIN" not in json.dumps(after_tool)
    # The plain follow-up waited for the next run.
    assert chats[2]["messages"][-1] == {"role": "user", "content": "PLAIN: then add a changelog"}
    first_run, second_run = Run.objects.filter(session=session).order_by("attempt")
    injected = Event.objects.get(session=session, type="message_injected")
    assert injected.run_id == first_run.pk and injected.payload["message_id"] == steer.json()["id"]
    assert Message.objects.get(pk=steer.json()["id"]).run_id == first_run.pk
    assert Message.objects.get(pk=plain.json()["id"]).run_id == second_run.pk

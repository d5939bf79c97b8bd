"""Slack in the test process: signed requests through Django's test client into the real views, and
every outbound call sent by the real delivery pipeline through slack-sdk's ``WebClient`` to a
loopback fake of the Web API (tests/slack_fake.py). The worker-process paths are test_slack_live.py."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.utils import timezone

from integrations.deliveries import services
from integrations.deliveries.models import Delivery, DeliveryAttempt
from integrations.slack import checks, handler, messages
from integrations.slack.models import SeenRequest, SlackChannel, SlackThread, SlackUser, SlackWorkspace
from sessions.models import Event, Membership, Message, Role, Session, SessionBinding
from tests.conftest import client_for
from tests.slack_fake import (
    BOT_TOKEN,
    BOT_USER,
    CHANNEL_ID,
    SIGNING_SECRET,
    TEAM_ID,
    FakeSlack,
    action_payload,
    command_form,
    event_body,
    signed,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def slack(settings, tmp_path):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.DEFAULT_MODEL = "scripted/demo"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.BASE_URL = "https://deputies.example.test"
    settings.SLACK_SIGNING_SECRET = SIGNING_SECRET
    settings.SLACK_BOT_TOKEN = BOT_TOKEN
    settings.DELIVERY_BACKOFF_BASE = 0.001
    settings.DELIVERY_BACKOFF_MAX = 0.002
    with FakeSlack() as fake:
        settings.SLACK_API_URL = fake.url
        yield fake


@pytest.fixture
def workspace(team, repository, owner, slack):
    ws = SlackWorkspace.objects.create(slack_team_id=TEAM_ID, name="Test", team=team)
    SlackChannel.objects.create(
        team=team, name="#dev", workspace=ws, channel_id=CHANNEL_ID, repository=repository
    )
    slack.add_user("U0ALICE", "owner@example.com")
    return ws


def post(path: str, body: bytes, content_type: str, **headers: str):
    return Client().post(path, body, content_type=content_type, headers={**signed(body), **headers})


def command(text: str, **kwargs):
    body = urlencode(command_form(text, **kwargs)).encode()
    return post("/integrations/slack/commands", body, "application/x-www-form-urlencoded"), body


def event(ev: dict, event_id: str | None = None, **headers: str):
    body = json.dumps(event_body(ev, event_id)).encode()
    return post("/integrations/slack/events", body, "application/json", **headers)


def click(action_id: str, session_id: int, user: str = "U0ALICE"):
    body = urlencode({"payload": json.dumps(action_payload(action_id, session_id, user))}).encode()
    return post("/integrations/slack/interactive", body, "application/x-www-form-urlencoded")


def drain(timeout: float = 10) -> None:
    """Send every due Slack delivery through the real pipeline until none is left pending."""
    deadline = time.monotonic() + timeout
    while True:
        due = list(
            Delivery.objects.filter(
                kind="slack", status=Delivery.Status.PENDING, next_attempt__lte=timezone.now()
            )
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        if not due and not Delivery.objects.filter(kind="slack", status=Delivery.Status.PENDING).exists():
            return
        for pk in due:
            services.send(pk)
        assert time.monotonic() < deadline, list(
            Delivery.objects.filter(status="pending").values("payload", "last_error")
        )
        time.sleep(0.005)


# --- verification first -----------------------------------------------------------------------------


def test_it_answers_url_verification_with_the_challenge(slack):
    body = json.dumps({"type": "url_verification", "challenge": "c-123", "token": "x"}).encode()
    answer = post("/integrations/slack/events", body, "application/json")
    assert answer.status_code == 200 and answer.json() == {"challenge": "c-123"}


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Slack-Signature": "v0=" + "0" * 64},  # forged
        signed(b"something else"),  # signed for another body
        signed(b"", secret="not-the-secret"),
        {"X-Slack-Request-Timestamp": "not-a-number"},
    ],
)
def test_it_refuses_a_forged_signature_with_401_and_writes_nothing(workspace, headers):
    body = urlencode(command_form("fix the bug")).encode()
    good = signed(body)
    answer = Client().post(
        "/integrations/slack/commands", body, content_type="application/x-www-form-urlencoded",
        headers={**good, **headers},
    )  # fmt: skip
    assert answer.status_code == 401, answer.content
    assert "detail" in answer.json()
    assert not Session.objects.exists() and not SeenRequest.objects.exists() and not Delivery.objects.exists()


def test_it_refuses_a_stale_timestamp_with_401(workspace):
    body = urlencode(command_form("fix the bug")).encode()
    answer = Client().post(
        "/integrations/slack/commands", body, content_type="application/x-www-form-urlencoded",
        headers=signed(body, timestamp=int(time.time()) - 301),
    )  # fmt: skip
    assert answer.status_code == 401
    assert not Session.objects.exists() and not SeenRequest.objects.exists()


def test_it_answers_503_when_no_signing_secret_is_set(workspace, settings):
    settings.SLACK_SIGNING_SECRET = ""
    answer, _ = command("fix the bug")
    assert answer.status_code == 503 and "DEPUTIES_SLACK_SIGNING_SECRET" in answer.json()["detail"]
    assert not Session.objects.exists()


# --- slash command ----------------------------------------------------------------------------------


def test_it_queues_a_slash_command_and_answers_ephemerally_with_the_dashboard_link(workspace, slack, owner):
    answer, _ = command("Make the failing test pass")
    assert answer.status_code == 200
    session = Session.objects.get()
    body = answer.json()
    assert body["response_type"] == "ephemeral"
    assert f"https://deputies.example.test/sessions/{session.pk}" in body["text"]
    assert session.source == "slack" and session.created_by == owner and session.repository.name == "sample"
    assert session.messages.get().content == "Make the failing test pass"
    thread = SlackThread.objects.get(session=session)
    assert thread.trigger == "command" and thread.thread_ts == ""

    drain()
    root = slack.of("chat.postMessage")[0][1]
    assert (
        root["channel"] == CHANNEL_ID
        and "<@U0ALICE> asked Deputies" in root["text"]
        and "thread_ts" not in root
    )
    thread.refresh_from_db()
    assert thread.thread_ts == thread.root_ts == "1700000000.000001"
    binding = SessionBinding.objects.get(session=session)
    assert binding.key == f"slack:{TEAM_ID}:{CHANNEL_ID}:{thread.thread_ts}" and binding.source == "slack"
    status = slack.of("chat.postMessage")[1][1]
    assert status["thread_ts"] == thread.thread_ts and "Queued" in status["text"]
    assert slack.reactions() == ["+eyes"]
    assert {t for t in slack.tokens if t != ""} == {f"Bearer {BOT_TOKEN}"}
    assert SlackThread.objects.get(pk=thread.pk).status_ts == "1700000000.000002"


def test_it_names_the_repository_by_name_or_owner_and_name(workspace, team, sample_repo):
    from sessions.models import Repository

    other = Repository.objects.create(team=team, name="api", url="https://github.com/acme/api.git")
    command("api fix the login page")
    command("acme/api add a health check")
    command("sample run the tests")
    assert list(Session.objects.order_by("pk").values_list("repository__name", flat=True)) == [
        "api",
        "api",
        "sample",
    ]
    assert (
        Session.objects.filter(repository=other).order_by("pk").first().messages.get().content
        == "fix the login page"
    )


def test_it_refuses_an_unknown_owner_and_name_without_a_default(workspace):
    SlackChannel.objects.update(repository=None)
    answer, _ = command("acme/nope do it")
    assert "No repository 'acme/nope'" in answer.json()["text"]
    answer, _ = command("do it")
    assert "no default repository" in answer.json()["text"]
    assert not Session.objects.exists()


def test_it_answers_usage_for_an_empty_command(workspace):
    answer, _ = command("")
    assert "Usage: `/deputy [repository] <what to do>`" in answer.json()["text"]
    assert not Session.objects.exists()


def test_it_makes_one_session_for_a_replayed_command(workspace):
    first, body = command("fix the bug")
    again = Client().post("/integrations/slack/commands", body, content_type="application/x-www-form-urlencoded",
                          headers=signed(body))  # fmt: skip
    assert first.status_code == again.status_code == 200
    assert "already has this request" in again.json()["text"]
    assert Session.objects.count() == 1


def test_it_uses_the_channels_environment_and_model(workspace, team):
    from sessions.models import Environment

    env = Environment.objects.create(team=team, name="py", default_model="scripted/env-model")
    SlackChannel.objects.update(environment=env)
    command("one")
    SlackChannel.objects.update(model="scripted/channel-model")
    command("two")
    assert list(Session.objects.order_by("pk").values_list("model", "environment__name")) == [
        ("scripted/env-model", "py"), ("scripted/channel-model", "py"),
    ]  # fmt: skip


# --- who may ask ------------------------------------------------------------------------------------


def test_it_tells_an_unmapped_user_how_to_get_mapped_and_queues_nothing(workspace, slack):
    slack.add_user("U0STRANGER", "nobody@example.com")
    answer, _ = command("fix it", user="U0STRANGER")
    assert "not linked to a Deputies user" in answer.json()["text"]
    assert answer.json()["response_type"] == "ephemeral"
    assert not Session.objects.exists() and not Delivery.objects.exists()
    assert SlackUser.objects.get(slack_user_id="U0STRANGER").user is None


def test_it_does_not_map_an_unverified_email(workspace, slack):
    slack.add_user("U0SHADY", "owner@example.com", confirmed=False)
    answer, _ = command("fix it", user="U0SHADY")
    assert "not linked" in answer.json()["text"] and not Session.objects.exists()


def test_it_lets_a_viewer_watch_but_not_ask(workspace, slack, viewer):
    slack.add_user("U0VIEW", "viewer@example.com")
    answer, _ = command("fix it", user="U0VIEW")
    assert "viewer in the Deputies team 'alpha'" in answer.json()["text"]
    assert not Session.objects.exists()


def test_it_refuses_a_channel_not_allowed_and_a_workspace_not_connected(workspace, slack):
    answer, _ = command("fix it", channel="C0OTHER")
    assert "does not take requests in this channel" in answer.json()["text"]
    SlackWorkspace.objects.update(all_channels=True)
    answer, _ = command("sample fix it", channel="C0OTHER")
    assert answer.json()["text"].startswith(":inbox_tray: Queued")
    SlackWorkspace.objects.update(enabled=False)
    answer, _ = command("fix it again")
    assert "workspace is not connected" in answer.json()["text"]
    assert Session.objects.count() == 1


def test_it_honours_the_user_allowlist(workspace):
    SlackWorkspace.objects.update(allowed_users=["U0SOMEONE"])
    answer, _ = command("fix it")
    assert "not on the list of people" in answer.json()["text"] and not Session.objects.exists()


def test_it_prefers_an_admins_mapping_to_the_email_lookup(workspace, slack, teammate):
    SlackUser.objects.create(workspace=workspace, slack_user_id="U0ALICE", user=teammate, via="admin")
    command("fix it")
    assert Session.objects.get().created_by == teammate
    assert slack.of("users.info") == []


def test_it_looks_the_email_up_once_and_caches_it(workspace, slack, owner):
    command("one")
    command("two")
    assert len(slack.of("users.info")) == 1
    mapping = SlackUser.objects.get(slack_user_id="U0ALICE")
    assert mapping.user == owner and mapping.via == "email" and mapping.email == "owner@example.com"


# --- mentions, threads, follow-ups ------------------------------------------------------------------


def mention(
    text: str, ts: str = "1700000100.000100", thread_ts: str | None = None, user: str = "U0ALICE", **kw
):
    ev = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER}> {text}", "ts": ts}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return event(ev, **kw)


def test_it_starts_a_session_for_a_mention_and_binds_its_thread(workspace, slack):
    answer = mention("fix the flaky test")
    assert answer.status_code == 200
    session = Session.objects.get()
    assert session.messages.get().content == "fix the flaky test"
    assert SessionBinding.objects.get().key == f"slack:{TEAM_ID}:{CHANNEL_ID}:1700000100.000100"
    drain()
    assert slack.reactions() == ["+eyes"]
    assert slack.of("reactions.add")[0][1]["timestamp"] == "1700000100.000100"
    status = slack.of("chat.postMessage")[0][1]
    assert status["thread_ts"] == "1700000100.000100"


def test_it_turns_replies_in_the_thread_into_follow_ups_and_ignores_bots(workspace, slack):
    mention("fix the flaky test")
    session = Session.objects.get()
    reply = {"type": "message", "user": "U0ALICE", "text": "also update the docs", "ts": "1700000100.000200",
             "thread_ts": "1700000100.000100"}  # fmt: skip
    assert event(reply).status_code == 200
    bot = {**reply, "ts": "1700000100.000300", "bot_id": "B0BOT", "text": "I am a bot"}
    event(bot)
    edited = {**reply, "ts": "1700000100.000400", "subtype": "message_changed"}
    event(edited)
    top_level = {"type": "message", "user": "U0ALICE", "text": "unrelated", "ts": "1700000100.000500"}
    event(top_level)
    other_thread = {**reply, "ts": "1700000100.000600", "thread_ts": "1600000000.000001"}
    event(other_thread)
    # The same reply as a mention arrives twice (message + app_mention): one follow-up.
    both = {"user": "U0ALICE", "text": f"<@{BOT_USER}> and the changelog", "ts": "1700000100.000700",
            "thread_ts": "1700000100.000100"}  # fmt: skip
    event({**both, "type": "message"})
    event({**both, "type": "app_mention"})
    contents = list(
        Message.objects.filter(session=session).order_by("position").values_list("content", flat=True)
    )
    assert contents == ["fix the flaky test", "also update the docs", "and the changelog"]
    assert Session.objects.count() == 1
    assert SeenRequest.objects.count() == 3  # the ignored messages left no row
    drain()
    assert sorted(p["timestamp"] for _, p in slack.of("reactions.add")) == [
        "1700000100.000100", "1700000100.000200", "1700000100.000700",
    ]  # fmt: skip


def test_it_never_makes_a_second_session_for_a_slack_retry(workspace):
    mention("fix it", event_id="Ev0SAME")
    again = mention(
        "fix it", event_id="Ev0SAME", **{"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    )
    assert again.status_code == 200
    assert Session.objects.count() == 1 and SeenRequest.objects.filter(key="event:Ev0SAME").count() == 1


def test_it_answers_a_refused_mention_with_an_ephemeral_message(workspace, slack, viewer):
    slack.add_user("U0VIEW", "viewer@example.com")
    mention("fix it", user="U0VIEW")
    assert not Session.objects.exists()
    drain()
    ((_, sent),) = slack.of("chat.postEphemeral")
    assert sent["user"] == "U0VIEW" and sent["channel"] == CHANNEL_ID and "viewer" in sent["text"]
    delivery = Delivery.objects.get(kind="slack")
    assert delivery.session is None and delivery.status == "delivered"


# --- buttons ----------------------------------------------------------------------------------------


def test_it_cancels_from_the_cancel_button(workspace, slack):
    command("long job")
    session = Session.objects.get()
    drain()
    answer = click(messages.CANCEL, session.pk)
    assert answer.status_code == 200
    session.refresh_from_db()
    assert session.status == "cancelled"
    drain()
    assert "+x" in slack.reactions()
    final = [p for _, p in slack.of("chat.postMessage") if p["text"].startswith("Cancelled")]
    assert len(final) == 1
    retry = [e for b in final[0]["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert any(e.get("action_id") == messages.RETRY for e in retry)
    update = slack.of("chat.update")[-1][1]
    assert "Cancelled" in update["text"]


def test_it_retries_from_the_retry_button_and_refuses_a_viewer(workspace, slack, viewer):
    command("long job")
    session = Session.objects.get()
    click(messages.CANCEL, session.pk)
    slack.add_user("U0VIEW", "viewer@example.com")
    click(messages.RETRY, session.pk, user="U0VIEW")
    session.refresh_from_db()
    assert session.status == "cancelled"
    click(messages.RETRY, session.pk)
    session.refresh_from_db()
    assert session.status == "queued" and session.runs.count() == 2
    drain()
    refused = [p for _, p in slack.of("chat.postEphemeral") if p["user"] == "U0VIEW"]
    assert refused and "viewer" in refused[0]["text"]


# --- outbound: Retry-After, Slack down ----------------------------------------------------------------


def test_it_waits_as_long_as_a_429_asks(workspace, slack):
    command("fix it")
    slack.limited = [7]
    root = Delivery.objects.get(kind="slack")
    services.send(root.pk)
    attempt = DeliveryAttempt.objects.get(delivery=root)
    assert attempt.status_code == 429 and attempt.retry_in_seconds == 7.0
    root.refresh_from_db()
    assert root.status == "pending" and 6.5 < (root.next_attempt - timezone.now()).total_seconds() <= 7


def test_it_keeps_the_thread_in_order_after_slack_comes_back(workspace, slack):
    """Slack down while the session ends: the end message waits for the thread's first message."""
    command("fix it")
    slack.down = True
    slack.calls.clear()
    session = Session.objects.get()
    click(messages.CANCEL, session.pk)  # ends the run: the end message is queued behind the first one
    for pk in Delivery.objects.filter(kind="slack").values_list("pk", flat=True):
        services.send(pk)
    assert not slack.calls
    root = Delivery.objects.get(kind="slack", idempotency_key=f"root-{session.pk}")
    assert root.status == "pending" and root.last_status_code == 500
    assert not Delivery.objects.filter(status="failed").exists()
    slack.down = False
    Delivery.objects.filter(kind="slack").update(next_attempt=timezone.now())
    drain()
    posts = slack.texts()
    assert posts[0].startswith("<@U0ALICE> asked Deputies") and posts[-1].startswith("Cancelled")
    assert len(posts) == 3  # first message, status message, end message
    assert "Cancelled" in posts[1]  # the status message shows the state of when it was sent
    assert set(Delivery.objects.filter(kind="slack").values_list("status", flat=True)) == {"delivered"}


@pytest.mark.django_db(transaction=True)
def test_it_edits_the_status_message_with_the_plan(workspace, slack, settings):
    settings.SLACK_STATUS_INTERVAL = 60
    mention("fix the flaky test")
    session = Session.objects.get()
    drain()
    from sessions.events import emit

    run = session.runs.get()
    emit(session.pk, "todo", {"todos": [{"content": "Run the tests", "status": "completed"},
                                        {"content": "Fix it", "status": "in_progress"}]}, run_id=run.pk)  # fmt: skip
    drain()
    ((_, update),) = slack.of("chat.update")
    assert update["ts"] == SlackThread.objects.get().status_ts
    plan = update["blocks"][1]["text"]["text"]
    assert plan == ":white_check_mark: Run the tests\n:arrow_forward: Fix it"
    # Throttled: a second change in the same interval makes no second edit.
    emit(session.pk, "todo", {"todos": [{"content": "Run the tests", "status": "completed"}]}, run_id=run.pk)
    drain()
    assert len(slack.of("chat.update")) == 1
    assert Event.objects.filter(session=session, type="callback_sent").count() >= 3


def test_a_claimed_run_gets_the_hourglass_and_its_status_and_other_sessions_nothing(
    workspace, slack, team, repository
):
    from sessions.models import start_session
    from sessions.runner import claim

    mention("fix the flaky test")
    session = Session.objects.get()
    drain()
    run, why = claim(session.runs.get().pk)
    assert why == "claimed"
    drain()
    assert slack.reactions() == ["+eyes", "+hourglass_flowing_sand"]
    assert len(slack.of("chat.update")) == 1  # the status message says it is running
    other = start_session(team=team, repository=repository, prompt="Go", model="scripted/demo")
    before = Delivery.objects.filter(kind="slack").count()
    assert claim(other.runs.get().pk)[1] == "claimed"
    assert Delivery.objects.filter(kind="slack").count() == before


# --- API, /setup, manifest --------------------------------------------------------------------------


def test_it_scopes_channel_defaults_to_the_team(workspace, owner, teammate, viewer, outsider, repository):
    channel = SlackChannel.objects.get()
    assert client_for(None).get("/api/v1/slack-channels").status_code == 401
    url = f"/api/v1/slack-channels/{channel.pk}"
    assert client_for(viewer).patch(url, {"model": "scripted/x"}, format="json").status_code == 403
    assert client_for(outsider).patch(url, {"model": "scripted/x"}, format="json").status_code == 404
    assert client_for(outsider).get("/api/v1/slack-channels").json()["results"] == []
    edited = client_for(teammate).patch(url, {"model": "scripted/x"}, format="json")
    assert edited.status_code == 200 and edited.json()["model"] == "scripted/x"
    body = {"name": "#ops", "workspace": TEAM_ID, "channel_id": "C0OPS", "repository": repository.pk,
            "model": "scripted/demo"}  # fmt: skip
    created = client_for(owner).post("/api/v1/slack-channels", body, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["workspace"] == TEAM_ID and created.json()["repository"] == repository.pk
    assert client_for(viewer).post("/api/v1/slack-channels", {**body, "name": "#x", "channel_id": "C0X"},
                                   format="json").status_code == 403  # fmt: skip
    assert client_for(outsider).get(f"/api/v1/slack-channels/{channel.pk}").status_code == 404
    dup = client_for(owner).post("/api/v1/slack-channels", {**body, "name": "#ops2"}, format="json")
    assert dup.status_code == 400 and "channel_id" in dup.json()["errors"]
    bad = client_for(owner).post("/api/v1/slack-channels", {**body, "name": "#m", "channel_id": "C0M",
                                                             "model": "nope"}, format="json")  # fmt: skip
    assert bad.status_code == 400 and "model" in bad.json()["errors"]
    assert [c["name"] for c in client_for(viewer).get("/api/v1/slack-channels").json()["results"]] == [
        "#dev",
        "#ops",
    ]
    assert client_for(owner).delete(f"/api/v1/slack-channels/{created.json()['id']}").status_code == 204


def test_it_shows_the_setup_card_without_secret_values(workspace, settings):
    card = checks.check()
    assert card.status == "ok"
    shown = json.dumps([card.summary, card.fix, card.details])
    assert BOT_TOKEN not in shown and SIGNING_SECRET not in shown
    assert ("Bot token (DEPUTIES_SLACK_BOT_TOKEN)", "present") in card.details
    assert ("App token (DEPUTIES_SLACK_APP_TOKEN)", "missing") in card.details
    settings.SLACK_BOT_TOKEN = ""
    assert checks.check().status == "error" and "DEPUTIES_SLACK_BOT_TOKEN" in checks.check().fix
    settings.SLACK_BOT_TOKEN = settings.SLACK_SIGNING_SECRET = ""
    assert checks.check().status == "off" and "deputies slack manifest" in checks.check().fix


def test_it_prints_a_manifest_for_http_and_for_socket_mode(capsys, settings):
    from deputies.cli import main

    settings.BASE_URL = "https://deputies.example.test"
    assert main(["slack", "manifest", "--socket-mode", "off"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["settings"]["event_subscriptions"]["request_url"] == (
        "https://deputies.example.test/integrations/slack/events"
    )
    assert manifest["features"]["slash_commands"][0]["url"].endswith("/integrations/slack/commands")
    assert {"app_mention", "message.channels"} <= set(
        manifest["settings"]["event_subscriptions"]["bot_events"]
    )
    assert "users:read.email" in manifest["oauth_config"]["scopes"]["bot"]
    assert main(["slack", "manifest", "--socket-mode", "on"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["settings"]["socket_mode_enabled"] is True
    assert "request_url" not in manifest["settings"]["event_subscriptions"]


def test_it_answers_the_same_through_the_handler_as_over_http(workspace):
    """Socket Mode hands the handler the same payloads (tests/test_slack_live.py drives the socket)."""
    answer = handler.handle_command(command_form("fix it"))
    assert answer.body["response_type"] == "ephemeral" and Session.objects.count() == 1
    assert Membership.objects.filter(role=Role.OWNER).exists()


def test_it_says_in_one_line_what_socket_mode_needs(capsys, settings):
    from deputies.cli import main

    settings.SLACK_APP_TOKEN = ""
    assert main(["slack"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "deputies: DEPUTIES_SLACK_APP_TOKEN is not set: Socket Mode needs the app-level token (xapp-...)"
    ]


def test_it_documents_every_slack_setting_in_the_readme():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    names = set(re.findall(r'"(DEPUTIES_SLACK_[A-Z_]+)"', (root / "deputies" / "settings.py").read_text()))
    readme = (root / "README.md").read_text()
    assert names and {n for n in names if f"`{n}`" not in readme} == set()


def test_it_ignores_a_stale_cancel_or_retry_button(workspace, slack):
    command("quick job")
    session = Session.objects.get()
    Session.objects.filter(pk=session.pk).update(status="idle")
    click(messages.CANCEL, session.pk)
    click(messages.RETRY, session.pk)
    session.refresh_from_db()
    assert session.status == "idle" and session.runs.count() == 1
    drain()
    notes = [p["text"] for _, p in slack.of("chat.postEphemeral")]
    assert notes == [
        "Nothing to do: the session is idle already.",
        "Nothing to do: the session is idle; only a failed or cancelled one is retried.",
    ]


def test_it_keeps_a_channels_defaults_in_its_team(workspace, other_team):
    from django.core.exceptions import ValidationError

    from sessions.models import Repository

    foreign = Repository.objects.create(team=other_team, name="theirs", url="https://example.com/t.git")
    channel = SlackChannel.objects.get()
    channel.repository = foreign
    with pytest.raises(ValidationError) as caught:
        channel.full_clean()
    assert "repository" in caught.value.message_dict


def test_it_shows_the_slack_card_on_the_setup_page(workspace, admin_client, settings):
    page = admin_client.get("/setup").content.decode()
    assert "Slack" in page and "HTTP at https://deputies.example.test/integrations/slack/" in page
    assert BOT_TOKEN not in page and SIGNING_SECRET not in page
    settings.SLACK_BOT_TOKEN = settings.SLACK_SIGNING_SECRET = ""
    assert "deputies slack manifest" in admin_client.get("/setup").content.decode()


def test_it_maps_a_slack_user_in_the_admin(workspace, admin_client, teammate):
    for model in ("slackworkspace", "slackchannel", "slackuser", "slackthread", "seenrequest"):
        assert admin_client.get(f"/admin/slack/{model}/").status_code == 200, model
    answer = admin_client.post(
        "/admin/slack/slackuser/add/",
        {
            "workspace": workspace.pk,
            "slack_user_id": "U0BOB",
            "user": teammate.pk,
            "via": "email",
            "email": "",
        },
    )
    assert answer.status_code == 302, answer.content.decode()[:2000]
    mapping = SlackUser.objects.get(slack_user_id="U0BOB")
    assert mapping.user == teammate and mapping.via == "admin"  # an admin's mapping is never looked up again


def test_it_shows_slack_messages_on_the_session_timeline(workspace, slack, owner):
    mention("fix the flaky test")
    drain()
    session = Session.objects.get()
    browser = Client()
    browser.force_login(owner)
    page = browser.get(f"/sessions/{session.pk}").content.decode()
    assert f"Slack message delivered to {CHANNEL_ID} 1700000100.000100" in page
    assert "Slack #dev" in page  # where it came from


def test_it_answers_400_naming_the_field_for_a_signed_but_broken_body(workspace):
    answer = post("/integrations/slack/events", b"not json", "application/json")
    assert answer.status_code == 400 and "body" in answer.json()["errors"]
    answer = post("/integrations/slack/interactive", b"payload=%7Bnope", "application/x-www-form-urlencoded")
    assert answer.status_code == 400 and "payload" in answer.json()["errors"]
    assert not SeenRequest.objects.exists() and not Session.objects.exists()

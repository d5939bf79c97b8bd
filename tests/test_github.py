"""The GitHub App against a loopback GitHub (tests/github_fake.py) that the real PyGithub talks to:
the webhook's checks and triggers, installation tokens, and the ``github`` deliveries."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integrations.deliveries import services as deliveries
from integrations.deliveries.models import Delivery
from integrations.github import client
from integrations.github.models import Installation, SeenDelivery
from sessions.models import Message, Repository, Session, SessionBinding
from tests.github_fake import APP_ID, INSTALLATION_ID, FakeGitHub, issue_comment, new_app_key, signed

SECRET = "gh-webhook-secret-value"
REPO = "acme/widgets"
KEY = new_app_key()


@pytest.fixture
def fake(tmp_path, loopback_remotes, sample_repo):
    settings = loopback_remotes  # the fake's clone URLs are http://127.0.0.1:<port>/...
    private, public = KEY
    with FakeGitHub(tmp_path / "git", public_key=public) as fake:
        fake.add_repo(REPO, sample_repo, writers=("alice",))
        settings.GITHUB_API_URL = fake.url
        settings.GITHUB_APP_ID = APP_ID
        settings.GITHUB_PRIVATE_KEY = private
        settings.GITHUB_WEBHOOK_SECRET = SECRET
        settings.GITHUB_TOKEN = ""
        settings.DEFAULT_MODEL = "scripted/demo"
        yield fake


@pytest.fixture
def installation(team):
    return Installation.objects.create(installation_id=INSTALLATION_ID, account="acme", team=team)


def post(client, payload: dict, event: str = "issue_comment", guid: str = "d-1", secret: str = SECRET):
    raw, headers = signed(secret, payload, event, guid)
    return client.post(
        "/integrations/github/webhook",
        data=raw,
        content_type="application/json",
        **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items() if k != "Content-Type"},
    )


@pytest.mark.django_db
def test_it_refuses_a_forged_signature_before_reading_the_body(client, fake, installation):
    issue = fake.add_issue(REPO, "Tests fail", "calc is broken")
    answer = post(client, issue_comment(fake, REPO, issue, "/deputy fix it"), secret="not-the-secret")
    assert answer.status_code == 401 and "X-Hub-Signature-256" in answer.json()["detail"]
    answer = client.post("/integrations/github/webhook", data=b"{", content_type="application/json")
    assert answer.status_code == 401
    assert not Session.objects.exists() and not SeenDelivery.objects.exists() and fake.calls == []


@pytest.mark.django_db
def test_it_answers_ping_and_ignores_events_it_does_not_handle(client, fake, installation):
    assert post(client, {"zen": "Keep it simple."}, event="ping").json() == {
        "pong": True,
        "zen": "Keep it simple.",
    }
    answer = post(client, {"action": "published", "sender": {"login": "alice"}}, event="release")
    assert answer.status_code == 202 and answer.json()["ignored"]
    assert not Session.objects.exists() and fake.calls == []


@pytest.mark.django_db
def test_it_starts_a_session_for_a_writers_trigger_with_the_issue_as_context(client, fake, installation):
    issue = fake.add_issue(
        REPO, "add() is wrong", "add(2, 2) returns 0.", comments=[("bob", "Confirmed on main.")]
    )
    answer = post(client, issue_comment(fake, REPO, issue, "/deputy fix the failing test"))
    assert answer.status_code == 202, answer.content
    session = Session.objects.get(pk=answer.json()["session"])
    assert session.source == "github" and session.title == "add() is wrong"
    assert session.external_ref["github"]["repo"] == REPO
    assert session.external_ref["github"]["requested_by"] == {"login": "alice", "id": 5}
    binding = SessionBinding.objects.get(session=session)
    assert binding.key == f"github:{REPO}#{issue['number']}"
    prompt = Message.objects.get(session=session).content
    assert "add(2, 2) returns 0." in prompt and "@bob: Confirmed on main." in prompt
    assert prompt.endswith("Request from @alice:\nfix the failing test")
    repository = Repository.objects.get(team=installation.team)
    assert (repository.name, repository.url, repository.provider) == (REPO, fake.clone_url(REPO), "github")
    # The JWT was accepted (the fake verifies it with the app's public key), the permission was read.
    assert len(fake.calls_to("POST", r"/access_tokens$")) == 1
    assert fake.calls_to("GET", r"/collaborators/alice/permission$")[0].status == 200
    # The 👀 is a delivery, sent by a worker through the real PyGithub.
    reaction = Delivery.objects.get(session=session, kind="github")
    assert reaction.payload["content"] == "eyes" and reaction.status == "pending"
    assert deliveries.send(reaction.pk) == "delivered"
    assert fake.repos[REPO].reactions == [
        (f"/issues/comments/{issue_comment_id(fake, issue)}/reactions", "eyes")
    ]


def issue_comment_id(fake, issue) -> int:
    return fake.repos[REPO].comments[issue["number"]][-1]["id"]


@pytest.mark.django_db
def test_it_makes_a_duplicate_delivery_a_no_op(client, fake, installation):
    issue = fake.add_issue(REPO, "Bug", "")
    payload = issue_comment(fake, REPO, issue, "/deputy fix it")
    assert post(client, payload, guid="same").status_code == 202
    again = post(client, payload, guid="same")
    assert again.status_code == 200 and again.json() == {"duplicate": True}
    assert Session.objects.count() == 1 and Message.objects.count() == 1
    assert Delivery.objects.count() == 1


@pytest.mark.django_db
def test_it_queues_nothing_for_a_commenter_without_write_access(client, fake, installation, settings):
    issue = fake.add_issue(REPO, "Bug", "")
    answer = post(client, issue_comment(fake, REPO, issue, "/deputy fix it", login="mallory"))
    assert answer.status_code == 202 and answer.json()["reason"] == "the commenter has no write access"
    assert not Session.objects.exists() and not Delivery.objects.exists()
    assert fake.calls_to("GET", r"/collaborators/mallory/permission$")
    assert not fake.calls_to("POST", r"/comments$")
    settings.GITHUB_REPLY_TO_NON_WRITERS = True
    post(client, issue_comment(fake, REPO, issue, "/deputy please", login="mallory"), guid="d-2")
    replies = fake.repos[REPO].comments[issue["number"]]
    assert replies[-1]["body"].startswith("@mallory only people with write access")
    assert not Session.objects.exists()


@pytest.mark.django_db
def test_it_ignores_comments_without_the_phrase_and_comments_of_bots(client, fake, installation):
    issue = fake.add_issue(REPO, "Bug", "")
    for n, (text, sender) in enumerate(
        [
            ("Looks like /deputyish stuff", "alice"),
            ("Thanks!", "alice"),
            ("/deputy again", "deputies[bot]"),
            ("Done.\n/deputy again\n<!-- deputies -->", "alice"),  # ours, posted with a personal token
        ]
    ):
        payload = issue_comment(fake, REPO, issue, text, login=sender)
        if sender.endswith("[bot]"):
            payload["sender"]["type"] = "Bot"
        answer = post(client, payload, guid=f"d-{n}")
        assert answer.status_code == 202 and answer.json()["ignored"], answer.content
    assert not Session.objects.exists() and fake.calls == []


@pytest.mark.django_db
def test_it_makes_later_triggers_follow_ups_and_an_issue_with_the_label_a_session(client, fake, installation):
    issue = fake.add_issue(REPO, "Bug", "body")
    first = post(client, issue_comment(fake, REPO, issue, "/deputy fix it"), guid="a").json()
    second = post(client, issue_comment(fake, REPO, issue, "/Deputy also the docs"), guid="b").json()
    assert second == {"session": first["session"], "created": False}
    contents = list(
        Message.objects.filter(session=first["session"])
        .order_by("position")
        .values_list("content", flat=True)
    )
    assert contents[1] == f"Follow-up from @alice on {REPO}#{issue['number']}:\nalso the docs"
    # Two webhooks, one installation token: it is cached.
    assert len(fake.calls_to("POST", r"/access_tokens$")) == 1

    labelled = fake.add_issue(REPO, "Label me", "Please do it")
    payload = issue_comment(fake, REPO, labelled, "ignored")
    payload = {**payload, "action": "labeled", "label": {"name": "deputy"}}
    answer = post(client, payload, event="issues", guid="c")
    assert answer.status_code == 202 and answer.json()["created"], answer.content
    session = Session.objects.get(pk=answer.json()["session"])
    assert Message.objects.get(session=session).content.endswith("Work on this issue.")
    payload["label"] = {"name": "bug"}
    assert post(client, payload, event="issues", guid="d").json()["ignored"]


@pytest.mark.django_db
def test_it_ignores_an_installation_no_team_is_mapped_to(client, fake):
    issue = fake.add_issue(REPO, "Bug", "")
    answer = post(client, issue_comment(fake, REPO, issue, "/deputy fix it"))
    assert answer.status_code == 202 and "not mapped" in answer.json()["reason"]
    assert not Session.objects.exists()


@pytest.mark.django_db
def test_it_answers_502_and_keeps_nothing_when_github_fails_so_a_redelivery_works(client, fake, installation):
    issue = fake.add_issue(REPO, "Bug", "")
    payload = issue_comment(fake, REPO, issue, "/deputy fix it")
    fake.fail_next("GET", r"/permission$", 500)
    assert post(client, payload, guid="x").status_code == 502
    assert not Session.objects.exists() and not SeenDelivery.objects.exists()
    assert post(client, payload, guid="x").status_code == 202
    assert Session.objects.count() == 1


@pytest.mark.django_db
def test_it_retries_a_comment_after_a_500_and_honours_a_secondary_rate_limit(client, fake, installation):
    issue = fake.add_issue(REPO, "Bug", "")
    session = Session.objects.get(
        pk=post(client, issue_comment(fake, REPO, issue, "/deputy x")).json()["session"]
    )
    from integrations.github.senders import comment

    comment(session, body="Hello from Deputies", idempotency_key="t-1", event="test")
    delivery = Delivery.objects.get(session=session, event="test")
    fake.fail_next("POST", r"/issues/\d+/comments$", 500)
    assert deliveries.send(delivery.pk) == "pending"
    delivery.refresh_from_db()
    assert delivery.attempts == 1 and delivery.status == "pending"
    fake.fail_next("POST", r"/issues/\d+/comments$", 403, {"Retry-After": "120"})
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt=delivery.created)
    deliveries.send(delivery.pk)
    limited = delivery.attempt_log.get(number=2)
    assert limited.status_code == 403 and limited.retry_in_seconds == 120
    reset = int(time.time()) + 90  # the primary limit: wait for its reset
    fake.fail_next(
        "POST", r"/issues/\d+/comments$", 403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
    )
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt=delivery.created)
    deliveries.send(delivery.pk)
    assert 80 <= delivery.attempt_log.get(number=3).retry_in_seconds <= 91
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt=delivery.created)
    assert deliveries.send(delivery.pk) == "delivered"
    assert fake.repos[REPO].comments[issue["number"]][-1]["body"].startswith("Hello from Deputies\n")


def test_it_prints_an_app_manifest_with_the_webhook_url_and_permissions(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "DEPUTIES_DATA_DIR": str(tmp_path),
        "DEPUTIES_BASE_URL": "https://deputies.example.test",
    }
    out = subprocess.run(
        [str(Path(sys.executable).parent / "deputies"), "github", "manifest", "--name", "Our deputies"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    manifest = json.loads(out.stdout)
    assert manifest["name"] == "Our deputies"
    assert manifest["hook_attributes"]["url"] == "https://deputies.example.test/integrations/github/webhook"
    assert manifest["default_permissions"]["contents"] == "write"
    assert set(manifest["default_events"]) == {"issue_comment", "issues", "pull_request_review_comment"}


@pytest.mark.django_db
def test_it_labels_the_personal_access_token_fallback_on_setup(settings, installation):
    from integrations.github.checks import check

    settings.GITHUB_APP_ID, settings.GITHUB_PRIVATE_KEY, settings.GITHUB_TOKEN = "", "", "ghp_trial_token"
    settings.GITHUB_WEBHOOK_SECRET = SECRET
    card = check()
    assert card.status == "warn" and "Personal access token" in card.summary
    assert client.installation_token(0) == "ghp_trial_token"
    settings.GITHUB_TOKEN = ""
    assert check().status == "off"


@pytest.mark.django_db
def test_it_fails_the_run_clearly_and_says_so_on_the_issue_when_the_push_is_rejected(
    client, fake, installation, run_settings
):
    from sessions.agent.fake_llm import start_in_thread
    from sessions.runner import execute

    hook = fake.git_root / f"{REPO}.git" / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'branch protection: pushes need a review' >&2\nexit 1\n")
    hook.chmod(0o755)
    issue = fake.add_issue(REPO, "add() is broken", "")
    session_id = post(client, issue_comment(fake, REPO, issue, "/deputy fix it")).json()["session"]
    script = json.loads(Path("deputies/demo/script.json").read_text())
    script["responses"] = script["responses"][:6]
    with start_in_thread(script) as llm:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": llm.base_url, "api_key": "k"}
        }
        execute(Session.objects.get(pk=session_id).runs.get().pk)
    session = Session.objects.get(pk=session_id)
    run = session.runs.get()
    assert run.status == "failed" and session.status == "failed"
    assert f"the push of {session.branch} was rejected" in run.error and "branch protection" in run.error
    assert not fake.repos[REPO].pulls and session.pull_request_url == ""
    failed = session.events.get(type="run_failed")
    assert "was rejected" in failed.payload["error"]
    note = Delivery.objects.get(session=session, event="run.failed")
    assert deliveries.send(note.pk) == "delivered"
    body = fake.repos[REPO].comments[issue["number"]][-1]["body"]
    assert body.startswith("**Deputies failed.**") and "branch protection" in body
    for token in fake.tokens:
        assert token not in run.error and token not in body


@pytest.mark.django_db
def test_it_asks_for_a_new_installation_token_shortly_before_the_cached_one_expires(fake, installation):
    fake.token_ttl = client.REFRESH_MARGIN + 60
    first = client.installation_token(INSTALLATION_ID)
    assert client.installation_token(INSTALLATION_ID) == first
    assert len(fake.calls_to("POST", r"/access_tokens$")) == 1
    fake.token_ttl = client.REFRESH_MARGIN - 60  # this one is already within the margin
    client.forget_token(INSTALLATION_ID)
    second = client.installation_token(INSTALLATION_ID)
    third = client.installation_token(INSTALLATION_ID)
    assert len({first, second, third}) == 3 and len(fake.calls_to("POST", r"/access_tokens$")) == 3


@pytest.mark.django_db
def test_it_builds_on_the_pushed_commit_when_a_follow_up_gets_a_fresh_sandbox(
    client, fake, installation, run_settings
):
    from sandboxes.models import Sandbox
    from sessions.agent.fake_llm import start_in_thread
    from sessions.runner import execute

    issue = fake.add_issue(REPO, "add() is broken", "")
    session_id = post(client, issue_comment(fake, REPO, issue, "/deputy fix it")).json()["session"]
    script = json.loads(Path("deputies/demo/script.json").read_text())
    with start_in_thread(script) as llm:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": llm.base_url, "api_key": "k"}
        }
        session = Session.objects.get(pk=session_id)
        execute(session.runs.get().pk)
        session.refresh_from_db()
        assert session.status == "completed" and session.pull_request_url, session.runs.get().error
        first = fake.branch_log(REPO, session.branch)[0].split()[0]
        Sandbox.objects.filter(session=session).update(status=Sandbox.Status.DESTROYED)  # reaped
        (pr,) = fake.repos[REPO].pulls.values()
        follow = post(client, issue_comment(fake, REPO, pr, "/deputy changelog", pr=True), guid="d-2").json()
        assert follow == {"session": session_id, "created": False}
        execute(session.runs.order_by("-pk").first().pk)
    session.refresh_from_db()
    assert session.status == "completed", session.runs.order_by("-pk").first().error
    log = fake.branch_log(REPO, session.branch)
    assert len(log) == 3 and log[1].split()[0] == first  # the new commit's parent is the first push
    assert "return a + b" in fake.file_at(REPO, session.branch, "calc.py")  # the first run's fix stayed
    assert fake.file_at(REPO, session.branch, "CHANGELOG.md")
    assert session.events.filter(type="workspace_restored").exists()  # the new sandbox got the saved work


@pytest.mark.django_db
def test_it_reacts_to_a_review_comment_and_reports_a_cancelled_session(client, fake, installation):
    issue = fake.add_pull(REPO, "A pull request", head="tidy")
    payload = issue_comment(fake, REPO, issue, "/deputy tidy this up")
    payload["pull_request"] = payload.pop("issue")
    answer = post(client, payload, event="pull_request_review_comment")
    session = Session.objects.get(pk=answer.json()["session"])
    assert session.external_ref["github"]["is_pr"] is True
    assert deliveries.send(Delivery.objects.get(session=session).pk) == "delivered"
    assert fake.repos[REPO].reactions[-1][0] == f"/pulls/comments/{payload['comment']['id']}/reactions"
    assert session.cancel()
    note = Delivery.objects.get(session=session, event="run.cancelled")
    assert deliveries.send(note.pk) == "delivered"
    assert "the session was cancelled" in fake.repos[REPO].comments[issue["number"]][-1]["body"]


@pytest.mark.django_db
def test_it_never_lets_the_installation_token_into_the_sandbox(client, fake, installation, run_settings):
    from sessions.agent.fake_llm import start_in_thread
    from sessions.runner import execute

    issue = fake.add_issue(REPO, "Look around", "")
    session_id = post(client, issue_comment(fake, REPO, issue, "/deputy look")).json()["session"]
    look = "env; cat .git/config; git config --list --show-origin; ls -la .git"
    script = {
        "responses": [
            {"tool_calls": [{"name": "bash", "arguments": {"command": look}}]},
            {"tool_calls": [{"name": "finish", "arguments": {"summary": "Looked."}}]},
        ]
    }
    with start_in_thread(script) as llm:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": llm.base_url, "api_key": "k"}
        }
        execute(Session.objects.get(pk=session_id).runs.get().pk)
    session = Session.objects.get(pk=session_id)
    assert session.status == "completed", session.runs.get().error
    (seen,) = session.events.filter(type="tool_finished", payload__name="bash").values_list(
        "payload", flat=True
    )
    output = json.dumps(seen)
    assert "remote.origin.url" in output or "[remote" in output  # it did read the config
    # Not even redacted: the redactor would hide a leak, so its marker must not appear either.
    assert "[secret GITHUB_TOKEN]" not in output and "extraheader" not in output.lower()
    assert fake.tokens and not any(token in output for token in fake.tokens)
    assert not fake.repos[REPO].pulls  # nothing changed: nothing pushed


@pytest.mark.django_db
def test_it_works_on_top_of_a_pull_requests_branch_unless_it_comes_from_a_fork(client, fake, installation):
    own = fake.add_pull(REPO, "Feature", head="feature-x")
    answer = post(client, issue_comment(fake, REPO, own, "/deputy add tests", pr=True), guid="p-1")
    assert Session.objects.get(pk=answer.json()["session"]).base_branch == "feature-x"
    fork = fake.add_pull(REPO, "From a fork", head="patch-1", head_repo="someone/widgets")
    answer = post(client, issue_comment(fake, REPO, fork, "/deputy review", pr=True), guid="p-2")
    assert Session.objects.get(pk=answer.json()["session"]).base_branch == "main"


@pytest.mark.django_db
def test_it_refuses_a_repository_url_the_rules_do_not_allow(client, fake, installation, settings):
    settings.REPOSITORY_ALLOWED_NETWORKS = ()  # loopback is refused by default
    issue = fake.add_issue(REPO, "Bug", "")
    answer = post(client, issue_comment(fake, REPO, issue, "/deputy fix it"))
    assert answer.status_code == 202 and "DEPUTIES_REPOSITORY_ALLOWED_NETWORKS" in answer.json()["reason"]
    assert not Session.objects.exists() and not Repository.objects.exists()


@pytest.mark.django_db
def test_it_shows_the_app_and_its_installations_on_the_setup_page(admin_client, fake, installation):
    page = admin_client.get("/setup").content.decode()
    assert f"GitHub App {APP_ID}; webhooks at" in page and "/integrations/github/webhook" in page
    assert f"Installation {INSTALLATION_ID}" in page and "acme -&gt; team alpha" in page

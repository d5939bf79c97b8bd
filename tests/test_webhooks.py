"""Inbound webhooks on Postgres: verification, validation, dedupe, threads, callbacks, the source API.

Requests go through the whole Django stack (test client, raw bytes); concurrency against a live
``deputies web`` process is in test_webhooks_live.py.
"""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
from django.test import Client, TestCase
from django_q.models import OrmQ

from integrations.deliveries.models import CallbackSubscription
from integrations.webhooks.models import DedupeKey, SeenSignature, WebhookSource, sign
from sessions.models import Message, Repository, Run, Session, SessionBinding, Source
from tests.conftest import client_for

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def providers(settings, tmp_path):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.DEFAULT_MODEL = "scripted/demo"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.BASE_URL = "https://deputies.example.test"
    settings.CALLBACK_ALLOWED_NETWORKS = ()


def make_source(team, repository, auth="token", name="", **fields) -> tuple[WebhookSource, dict[str, str]]:
    name = name or f"ci-{auth}"
    source = WebhookSource(team=team, name=name, slug=name, auth=auth, repository=repository, **fields)
    shown = source.issue_credentials()
    source.save()
    return source, shown


@pytest.fixture
def token_source(team, repository):
    return make_source(team, repository, "token")


@pytest.fixture
def hmac_source(team, repository):
    return make_source(team, repository, "hmac")


def post(source: WebhookSource, body, token: str | None = None, headers: dict | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    # Run what the request left for after its commit (SQLite enqueues then; Postgres in the transaction).
    with TestCase.captureOnCommitCallbacks(execute=True):
        return Client().post(
            f"/integrations/webhooks/{source.slug}",
            data=raw,
            content_type="application/json",
            headers=all_headers,
        )


def signed(secret: str, body: dict, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    ts = int(time.time()) if timestamp is None else timestamp
    return raw, {"X-Deputies-Timestamp": str(ts), "X-Deputies-Signature": sign(secret, ts, raw)}


def nothing_written() -> bool:
    return not (
        Session.objects.exists()
        or Run.objects.exists()
        or OrmQ.objects.exists()
        or SeenSignature.objects.exists()
        or DedupeKey.objects.exists()
        or SessionBinding.objects.exists()
    )


# --- token sources ----------------------------------------------------------------------------------


def test_it_starts_a_session_for_a_request_with_the_sources_token(token_source, repository):
    source, shown = token_source
    response = post(
        source, {"prompt": "Fix the flaky test\nIt fails on CI.", "metadata": {"build": 812}}, shown["token"]
    )
    assert response.status_code == 202, response.content
    body = response.json()
    session = Session.objects.get(pk=body["session"])
    assert body["url"] == f"https://deputies.example.test/sessions/{session.pk}"
    assert body["created"] is True and body["deduplicated"] is False
    assert session.source == Source.WEBHOOK
    assert session.repository == repository
    assert session.model == "scripted/demo"
    assert session.title == "Fix the flaky test"
    assert session.external_ref == {"webhook_source": source.slug, "metadata": {"build": 812}}
    assert session.runs.get().status == Run.Status.QUEUED
    assert OrmQ.objects.count() == 1
    source.refresh_from_db()
    assert source.last_used is not None


def test_it_stores_only_the_hash_of_the_token(token_source):
    source, shown = token_source
    assert shown["token"] not in (source.token_hash, source.token_prefix, source.hmac_secret)
    assert shown["callback_secret"] not in source.callback_secret
    assert source.callback_signing_secret() == shown["callback_secret"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer whk_wrong"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
def test_it_refuses_a_bad_token_with_401_and_writes_nothing(token_source, headers):
    source, _ = token_source
    response = post(source, {"prompt": "Do it"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"]
    assert nothing_written()


def test_it_answers_404_for_an_unknown_or_disabled_source(token_source):
    source, shown = token_source
    response = Client().post("/integrations/webhooks/nope", data=b"{}", content_type="application/json")
    assert response.status_code == 404
    WebhookSource.objects.filter(pk=source.pk).update(enabled=False)
    assert post(source, {"prompt": "x"}, shown["token"]).status_code == 404
    assert nothing_written()


def test_it_takes_only_posts(token_source):
    source, _ = token_source
    assert Client().get(f"/integrations/webhooks/{source.slug}").status_code == 405


# --- HMAC sources -----------------------------------------------------------------------------------


def test_it_accepts_a_request_signed_over_the_raw_body(hmac_source):
    source, shown = hmac_source
    raw, headers = signed(shown["signing_secret"], {"prompt": "Bump the version"})
    response = post(source, raw, headers=headers)
    assert response.status_code == 202, response.content
    assert Session.objects.get().title == "Bump the version"
    assert SeenSignature.objects.count() == 1


def test_it_refuses_a_bad_signature(hmac_source):
    source, shown = hmac_source
    raw, headers = signed(shown["signing_secret"], {"prompt": "Bump"})
    tampered = raw.replace(b"Bump", b"Drop")
    assert post(source, tampered, headers=headers).status_code == 401
    headers["X-Deputies-Signature"] = sign("whsec_not-the-secret", headers["X-Deputies-Timestamp"], raw)
    assert post(source, raw, headers=headers).status_code == 401
    assert (
        post(source, raw, headers={"X-Deputies-Timestamp": headers["X-Deputies-Timestamp"]}).status_code
        == 401
    )
    assert nothing_written()


@pytest.mark.parametrize("age", [360, -360, None], ids=["old", "future", "garbage"])
def test_it_refuses_a_timestamp_outside_the_five_minute_window(hmac_source, age):
    source, shown = hmac_source
    if age is None:
        raw = b'{"prompt": "x"}'
        headers = {
            "X-Deputies-Timestamp": "yesterday",
            "X-Deputies-Signature": sign(shown["signing_secret"], "yesterday", raw),
        }
    else:
        raw, headers = signed(shown["signing_secret"], {"prompt": "x"}, int(time.time()) - age)
    response = post(source, raw, headers=headers)
    assert response.status_code == 401
    assert "X-Deputies-Timestamp" in response.json()["detail"]
    assert nothing_written()


def test_it_refuses_a_replayed_signature_and_queues_nothing_more(hmac_source):
    source, shown = hmac_source
    raw, headers = signed(shown["signing_secret"], {"prompt": "Once only"})
    assert post(source, raw, headers=headers).status_code == 202
    replay = post(source, raw, headers=headers)
    assert replay.status_code == 401
    assert "replay" in replay.json()["detail"]
    assert Session.objects.count() == 1 and Run.objects.count() == 1 and OrmQ.objects.count() == 1


def test_it_forgets_signatures_once_their_timestamp_left_the_window(hmac_source):
    source, shown = hmac_source
    old = int(time.time()) - 290
    raw, headers = signed(shown["signing_secret"], {"prompt": "Old but fresh enough"}, old)
    assert post(source, raw, headers=headers).status_code == 202
    SeenSignature.objects.update(timestamp=SeenSignature.objects.get().timestamp.replace(year=2000))
    raw2, headers2 = signed(shown["signing_secret"], {"prompt": "Next"})
    assert post(source, raw2, headers=headers2).status_code == 202
    assert SeenSignature.objects.count() == 1  # the stale row was pruned


# --- the body ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        ({}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x", "metadata": [1]}, "metadata"),
        ({"prompt": "x", "dedupe_key": "k" * 201}, "dedupe_key"),
        ({"prompt": "x", "repository": "no-such-repo"}, "repository"),
        ({"prompt": "x", "repository": "ftp://example.test/x.git"}, "repository"),
        ({"prompt": "x", "callback_url": "ftp://127.0.0.1/hook"}, "callback_url"),
        ({"prompt": "x", "callback_url": "http://127.0.0.1:9/hook"}, "callback_url"),
        ({"prompt": "x", "callback_url": "http://[::1]:9/hook"}, "callback_url"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_it_answers_400_naming_the_field_and_writes_nothing(token_source, body, field):
    source, shown = token_source
    response = post(source, body, shown["token"])
    assert response.status_code == 400, response.content
    assert list(response.json()["errors"]) == [field]
    assert nothing_written()


def test_it_names_the_model_when_the_source_has_none(settings, token_source):
    settings.DEFAULT_MODEL = ""
    source, shown = token_source
    response = post(source, {"prompt": "x"}, shown["token"])
    assert response.status_code == 400
    assert "model" in response.json()["errors"]


def test_a_source_without_a_model_takes_the_teams_default_profile_model(team, token_source):
    """The model order every new session gets (models.session_model): the profile's model comes
    before DEPUTIES_DEFAULT_MODEL, for the team's default profile too."""
    from sessions.models import AgentProfile

    team.default_profile = AgentProfile.objects.create(team=team, name="cheap", model="scripted/cheap")
    team.save(update_fields=["default_profile"])
    source, shown = token_source
    response = post(source, {"prompt": "x"}, shown["token"])
    assert response.status_code == 202, response.content
    session = Session.objects.get(pk=response.json()["session"])
    assert (session.model, session.profile.name) == ("scripted/cheap", "cheap")


def test_it_needs_a_repository_when_the_source_has_no_default(team):
    source, shown = make_source(team, None)
    response = post(source, {"prompt": "x"}, shown["token"])
    assert response.status_code == 400
    assert "no default" in response.json()["errors"]["repository"][0]


def test_it_finds_the_repository_by_name_or_url(team, token_source, loopback_remotes):
    source, shown = token_source
    other = Repository.objects.create(team=team, name="widgets", url="https://127.0.0.1/acme/widgets.git")
    by_name = post(source, {"prompt": "x", "repository": "widgets"}, shown["token"])
    assert Session.objects.get(pk=by_name.json()["session"]).repository == other
    by_url = post(source, {"prompt": "y", "repository": "https://127.0.0.1/acme/widgets.git"}, shown["token"])
    assert Session.objects.get(pk=by_url.json()["session"]).repository == other
    new = post(source, {"prompt": "z", "repository": "https://127.0.0.1/acme/gadgets.git"}, shown["token"])
    assert new.status_code == 202
    assert Session.objects.get(pk=new.json()["session"]).repository.name == "gadgets"


def test_it_keeps_requests_to_the_allowlist(team, other_team, repository, token_source, loopback_remotes):
    source, shown = token_source
    allowed = Repository.objects.create(team=team, name="allowed", url="https://127.0.0.1/acme/allowed.git")
    Repository.objects.create(team=team, name="other", url="https://127.0.0.1/acme/other.git")
    Repository.objects.create(team=other_team, name="theirs", url="https://127.0.0.1/beta/theirs.git")
    source.allowed_repositories.set([allowed])
    assert post(source, {"prompt": "a", "repository": "allowed"}, shown["token"]).status_code == 202
    assert post(source, {"prompt": "b"}, shown["token"]).status_code == 202  # the default is allowed
    for refused in ("other", "https://127.0.0.1/acme/new.git", "theirs"):
        response = post(source, {"prompt": "c", "repository": refused}, shown["token"])
        assert response.status_code == 400, refused
        assert list(response.json()["errors"]) == ["repository"]
    assert not Repository.objects.filter(name="new").exists()
    assert Session.objects.count() == 2


@pytest.mark.parametrize("url", ["/etc", "http://169.254.169.254/latest/", "ssh://-oProxyCommand=id/x"])
def test_it_refuses_an_unsafe_repository_url(token_source, url):
    source, shown = token_source
    response = post(source, {"prompt": "x", "repository": url}, shown["token"])
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["repository"]
    assert not Session.objects.exists() and not Repository.objects.filter(url=url).exists()


# --- dedupe and threads -----------------------------------------------------------------------------


def test_it_answers_a_repeated_dedupe_key_with_the_first_session(token_source):
    source, shown = token_source
    first = post(source, {"prompt": "Build 1 failed", "dedupe_key": "build-1"}, shown["token"])
    again = post(source, {"prompt": "Build 1 failed", "dedupe_key": "build-1"}, shown["token"])
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["session"] == first.json()["session"]
    assert again.json()["deduplicated"] is True
    assert Session.objects.count() == 1 and Run.objects.count() == 1 and Message.objects.count() == 1
    assert OrmQ.objects.count() == 1
    other = post(source, {"prompt": "Build 2 failed", "dedupe_key": "build-2"}, shown["token"])
    assert other.status_code == 202 and other.json()["session"] != first.json()["session"]


def test_it_keeps_dedupe_keys_per_source(team, repository, token_source):
    source, shown = token_source
    second, second_shown = make_source(team, repository, "token", name="second")
    a = post(source, {"prompt": "x", "dedupe_key": "same"}, shown["token"])
    b = post(second, {"prompt": "x", "dedupe_key": "same"}, second_shown["token"])
    assert a.status_code == b.status_code == 202
    assert a.json()["session"] != b.json()["session"]


def test_it_adds_a_message_in_a_known_thread_as_a_follow_up(token_source):
    source, shown = token_source
    first = post(source, {"prompt": "Fix issue 7", "thread_id": "issue-7"}, shown["token"])
    session = Session.objects.get(pk=first.json()["session"])
    assert session.thread_label == "ci-token: issue-7"
    assert session.external_ref["binding"] == f"webhook:{source.pk}:issue-7"
    assert session.external_ref["thread_id"] == "issue-7"
    follow = post(source, {"prompt": "Also update the docs", "thread_id": "issue-7"}, shown["token"])
    assert follow.status_code == 202
    assert follow.json()["session"] == session.pk and follow.json()["created"] is False
    assert follow.json()["message"]["position"] == 2
    assert list(session.messages.values_list("content", flat=True)) == ["Fix issue 7", "Also update the docs"]
    assert SessionBinding.objects.get().session == session
    other = post(source, {"prompt": "Fix issue 8", "thread_id": "issue-8"}, shown["token"])
    assert other.json()["session"] != session.pk


def test_it_starts_a_new_session_in_a_thread_whose_session_was_archived(token_source):
    source, shown = token_source
    first = post(source, {"prompt": "One", "thread_id": "t"}, shown["token"]).json()["session"]
    Session.objects.get(pk=first).archive()
    second = post(source, {"prompt": "Two", "thread_id": "t"}, shown["token"]).json()
    assert second["created"] is True and second["session"] != first
    assert SessionBinding.objects.get().session_id == second["session"]


def test_it_does_not_repeat_a_follow_up_with_a_seen_dedupe_key(token_source):
    source, shown = token_source
    post(source, {"prompt": "One", "thread_id": "t"}, shown["token"])
    body = {"prompt": "Two", "thread_id": "t", "dedupe_key": "msg-2"}
    assert post(source, body, shown["token"]).status_code == 202
    assert post(source, body, shown["token"]).status_code == 200
    assert Message.objects.count() == 2


# --- callbacks --------------------------------------------------------------------------------------


def test_it_refuses_a_loopback_callback_unless_allowed(settings, token_source):
    source, shown = token_source
    body = {"prompt": "x", "callback_url": "http://127.0.0.1:8123/hook"}
    refused = post(source, body, shown["token"])
    assert refused.status_code == 400
    assert "DEPUTIES_CALLBACK_ALLOWED_NETWORKS" in refused.json()["errors"]["callback_url"][0]
    assert nothing_written() and not CallbackSubscription.objects.exists()
    settings.CALLBACK_ALLOWED_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"),)
    accepted = post(source, body, shown["token"])
    assert accepted.status_code == 202
    subscription = CallbackSubscription.objects.get()
    assert subscription.session_id == accepted.json()["session"]
    assert subscription.url == "http://127.0.0.1:8123/hook"


# --- the session in the API and the dashboard ------------------------------------------------------


def test_it_shows_and_filters_the_source_and_thread(team, owner, repository, token_source):
    from sessions.models import start_session

    source, shown = token_source
    post(source, {"prompt": "From CI", "thread_id": "42"}, shown["token"])
    start_session(
        team=team, repository=repository, prompt="By hand", model="scripted/demo", source=Source.API
    )
    api = client_for(owner)
    listed = api.get("/api/v1/sessions?source=webhook").json()["results"]
    assert [s["title"] for s in listed] == ["From CI"]
    assert listed[0]["source"] == "webhook"
    assert listed[0]["thread"] == "ci-token: 42"
    assert listed[0]["external_ref"]["thread_id"] == "42"
    assert len(api.get("/api/v1/sessions").json()["results"]) == 2
    bad = api.get("/api/v1/sessions?source=carrier-pigeon")
    assert bad.status_code == 400 and "source" in bad.json()["errors"]
    browser = Client()
    browser.force_login(owner)
    page = browser.get("/?source=webhook").content.decode()
    assert "From CI" in page and "By hand" not in page and "ci-token: 42" in page
    assert 'option value="webhook" selected' in page
    session = Session.objects.get(title="From CI")
    assert "ci-token: 42" in browser.get(f"/sessions/{session.pk}").content.decode()


# --- the source API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["owner", "teammate"])
def test_it_lets_team_writers_create_a_source_and_shows_its_secrets_once(request, who, team, repository):
    user = request.getfixturevalue(who)
    api = client_for(user)
    created = api.post(
        "/api/v1/webhook-sources",
        {"name": "CI", "auth": "hmac", "repository": repository.pk, "allowed_repositories": [repository.pk]},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["signing_secret"].startswith("whsec_") and body["callback_secret"].startswith("whcb_")
    assert "token" not in body
    assert body["slug"] == "alpha-ci"
    assert body["url"] == "https://deputies.example.test/integrations/webhooks/alpha-ci"
    shown = api.get(f"/api/v1/webhook-sources/{body['id']}").json()
    assert not {"token", "signing_secret", "callback_secret"} & set(shown)
    assert shown["allowed_repositories"] == [repository.pk]
    # The secret it showed is the one the endpoint checks.
    source = WebhookSource.objects.get(pk=body["id"])
    raw, headers = signed(body["signing_secret"], {"prompt": "hello"})
    assert post(source, raw, headers=headers).status_code == 202
    token = api.post("/api/v1/webhook-sources", {"name": "Bot"}, format="json").json()
    assert token["auth"] == "token" and token["token"].startswith("whk_")
    assert token["token_prefix"] == token["token"][:10]


def test_it_lets_a_viewer_read_sources_but_not_write(team, owner, viewer, token_source):
    source, _ = token_source
    api = client_for(viewer)
    assert api.get("/api/v1/webhook-sources").json()["results"][0]["slug"] == source.slug
    assert api.get(f"/api/v1/webhook-sources/{source.pk}").status_code == 200
    assert (
        api.post("/api/v1/webhook-sources", {"name": "x", "team": "alpha"}, format="json").status_code == 403
    )
    assert (
        api.patch(f"/api/v1/webhook-sources/{source.pk}", {"enabled": False}, format="json").status_code
        == 403
    )
    assert api.delete(f"/api/v1/webhook-sources/{source.pk}").status_code == 403
    assert WebhookSource.objects.get().enabled


def test_it_hides_sources_from_outsiders(team, outsider, token_source):
    source, _ = token_source
    api = client_for(outsider)
    assert api.get("/api/v1/webhook-sources").json()["results"] == []
    for method in ("get", "patch", "delete"):
        assert (
            getattr(api, method)(f"/api/v1/webhook-sources/{source.pk}", {}, format="json").status_code == 404
        )
    assert (
        api.post("/api/v1/webhook-sources", {"name": "x", "team": "alpha"}, format="json").status_code == 400
    )
    assert WebhookSource.objects.count() == 1


def test_it_answers_401_to_anonymous_source_api_callers(token_source):
    from rest_framework.test import APIClient

    assert APIClient().get("/api/v1/webhook-sources").status_code == 401


def test_it_refuses_another_teams_repository_as_unknown(owner, other_team, team):
    theirs = Repository.objects.create(team=other_team, name="theirs", url="/srv/theirs")
    api = client_for(owner)
    for field, value in (("repository", theirs.pk), ("allowed_repositories", [theirs.pk])):
        response = api.post("/api/v1/webhook-sources", {"name": "x", field: value}, format="json")
        assert response.status_code == 400 and list(response.json()["errors"]) == [field]
    # The same words for a repository that does not exist: another team's existence does not leak.
    mine = api.post("/api/v1/webhook-sources", {"name": "x", "repository": theirs.pk}, format="json")
    missing = api.post("/api/v1/webhook-sources", {"name": "x", "repository": 999999}, format="json")
    assert mine.json()["errors"]["repository"][0].replace(str(theirs.pk), "N") == missing.json()["errors"][
        "repository"
    ][0].replace("999999", "N")


def test_it_refuses_to_change_a_sources_auth_or_take_a_used_slug(owner, token_source, hmac_source):
    source, _ = token_source
    api = client_for(owner)
    changed = api.patch(f"/api/v1/webhook-sources/{source.pk}", {"auth": "hmac"}, format="json")
    assert changed.status_code == 400 and "auth" in changed.json()["errors"]
    taken = api.patch(f"/api/v1/webhook-sources/{source.pk}", {"slug": "ci-hmac"}, format="json")
    assert taken.status_code == 400 and "slug" in taken.json()["errors"]
    ok = api.patch(f"/api/v1/webhook-sources/{source.pk}", {"model": "scripted/other"}, format="json")
    assert ok.status_code == 200 and ok.json()["model"] == "scripted/other"
    assert "token" not in ok.json()


# --- /setup -----------------------------------------------------------------------------------------


def test_it_shows_the_webhooks_card_on_the_setup_page(settings, team, repository, admin_client):
    page = admin_client.get("/setup").content.decode()
    assert "Inbound webhooks" in page and "No enabled webhook source yet." in page
    assert "not available in this version" not in page
    make_source(team, repository)
    page = admin_client.get("/setup").content.decode()
    assert "1 source(s) accept requests" in page
    settings.WEBHOOKS_ENABLED = False
    assert "DEPUTIES_WEBHOOKS_ENABLED=true" in admin_client.get("/setup").content.decode()


def test_it_shows_the_deliveries_card_on_the_setup_page(team, repository, admin_client):
    from datetime import timedelta

    from django.utils import timezone

    from integrations.deliveries.models import Delivery
    from sessions.models import start_session

    assert "Outbound deliveries" in admin_client.get("/setup").content.decode()
    session = start_session(team=team, repository=repository, prompt="x", model="scripted/demo")
    Delivery.objects.create(
        session=session,
        kind="http",
        target="https://example.test/hook",
        idempotency_key="k",
        next_attempt=timezone.now() - timedelta(minutes=10),
    )
    page = admin_client.get("/setup").content.decode()
    assert "due for over 2 minutes" in page and "deputies worker" in page


def test_it_accepts_a_signature_made_with_the_readme_recipe(hmac_source):
    import subprocess

    source, shown = hmac_source
    body = '{"prompt": "Fix the flaky test"}'
    ts = str(int(time.time()))
    script = """sig=$(printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$SIGNING_SECRET" -r | cut -d' ' -f1)
    printf 'sha256=%s' "$sig" """
    env = {"PATH": "/usr/bin:/bin", "ts": ts, "body": body, "SIGNING_SECRET": shown["signing_secret"]}
    signature = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    headers = {"X-Deputies-Timestamp": ts, "X-Deputies-Signature": signature}
    assert post(source, body.encode(), headers=headers).status_code == 202


def test_it_shows_new_credentials_once_when_an_operator_adds_a_source_in_the_admin(
    team, repository, admin_client
):
    response = admin_client.post(
        "/admin/webhooks/webhooksource/add/",
        {"team": team.pk, "name": "ops", "slug": "ops", "auth": "token", "repository": repository.pk,
         "model": "", "enabled": "on"},
        follow=True,
    )  # fmt: skip
    assert response.status_code == 200
    page = response.content.decode()
    source = WebhookSource.objects.get(slug="ops")
    token = page.split("token: ", 1)[1].split(";", 1)[0]
    assert token.startswith("whk_")
    assert post(source, {"prompt": "From the admin's token"}, token).status_code == 202
    listing = admin_client.get("/admin/webhooks/webhooksource/").content.decode()
    assert "ops" in listing and token not in listing
    assert (
        token not in admin_client.get(f"/admin/webhooks/webhooksource/{source.pk}/change/").content.decode()
    )


def test_it_rotates_a_sources_credentials_for_writers_only(owner, viewer, outsider, token_source):
    source, shown = token_source
    url = f"/api/v1/webhook-sources/{source.pk}/rotate"
    assert client_for(viewer).post(url).status_code == 403
    assert client_for(outsider).post(url).status_code == 404
    rotated = client_for(owner).post(url)
    assert rotated.status_code == 200
    token = rotated.json()["token"]
    assert token != shown["token"] and rotated.json()["callback_secret"] != shown["callback_secret"]
    source.refresh_from_db()
    assert post(source, {"prompt": "old"}, shown["token"]).status_code == 401
    assert post(source, {"prompt": "new"}, token).status_code == 202


def test_it_reencrypts_source_secrets_when_the_key_rotates(settings, team, repository):
    from django.core.management import call_command

    settings.SECRETS_KEYS = ["old"]
    source, shown = make_source(team, repository, "hmac")
    settings.SECRETS_KEYS = ["new", "old"]
    call_command("reencrypt_secrets")
    settings.SECRETS_KEYS = ["new"]
    source.refresh_from_db()
    assert source.callback_signing_secret() == shown["callback_secret"]
    raw, headers = signed(shown["signing_secret"], {"prompt": "After rotation"})
    assert post(source, raw, headers=headers).status_code == 202


def test_it_answers_409_for_a_thread_of_a_source_moved_to_another_team(other_team, token_source):
    source, shown = token_source
    post(source, {"prompt": "One", "thread_id": "t"}, shown["token"])
    WebhookSource.objects.filter(pk=source.pk).update(team=other_team)
    response = post(source, {"prompt": "Two", "thread_id": "t"}, shown["token"])
    assert response.status_code == 409 and list(response.json()["errors"]) == ["thread_id"]
    assert Message.objects.count() == 1

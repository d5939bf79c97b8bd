"""Environment secrets: encrypted at rest, given to the sandbox only when sandbox-visible, and never
seen again in events, artifacts, the model's requests or logs -- checked on a real run (local sandbox,
the scripted model over HTTP), through the REST API, the admin and the rotation command."""

from __future__ import annotations

import json
import logging

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from sessions.agent.fake_llm import start_in_thread
from sessions.models import Artifact, Environment, EnvironmentSecret, Event, Repository, Run, start_session
from sessions.runner import execute
from sessions.secrets import Redactor, Secret, SecretError, _StreamScrubber, decrypt, encrypt
from tests.conftest import client_for
from tests.live import child_env
from tests.test_cli import deputies
from tests.test_setup_script import repo_with_setup

VISIBLE = "tok-visible-4f9a1c7e"
HIDDEN = "tok-hidden-b83d55e0"
URL = "/api/v1/environments/"


def stored_ciphertexts() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT ciphertext FROM {EnvironmentSecret._meta.db_table}")
        return [row[0] for row in cursor.fetchall()]


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


# --- encryption and redaction -----------------------------------------------------------------------


def test_it_encrypts_with_the_first_key_and_decrypts_with_any(settings):
    settings.SECRETS_KEYS = ["old key"]
    token = encrypt("s3cret-value")
    assert "s3cret-value" not in token
    settings.SECRETS_KEYS = ["new key", "old key"]
    assert decrypt(token) == "s3cret-value"
    settings.SECRETS_KEYS = ["new key"]
    with pytest.raises(SecretError, match="DEPUTIES_SECRETS_KEY") as caught:
        decrypt(token, "secret API_TOKEN")
    assert "API_TOKEN" in str(caught.value) and "s3cret" not in str(caught.value)


def test_it_redacts_longest_values_first_and_bytes_too():
    redactor = Redactor([Secret("SHORT", "abcdef", True), Secret("LONG", "abcdefghij", False)])
    assert redactor.text("x abcdefghij y abcdef") == "x [secret LONG] y [secret SHORT]"
    assert redactor.data(b"\x00abcdef\xff") == b"\x00[secret SHORT]\xff"
    assert not Redactor([Secret("TINY", "abc", True)])  # too short to tell apart from output


def test_it_redacts_a_value_split_across_streamed_chunks():
    seen: list[tuple[str, str]] = []
    scrubber = _StreamScrubber(
        Redactor([Secret("TOKEN", "supersecret", True)]), lambda s, t: seen.append((s, t))
    )
    for chunk in ["key=sup", "ers", "ecret and ", "sup", "per\n"]:
        scrubber.write("stdout", chunk)
    scrubber.write("stderr", "err supersecr")
    scrubber.close()
    out = "".join(t for s, t in seen if s == "stdout")
    assert out == "key=[secret TOKEN] and supper\n"
    assert "".join(t for s, t in seen if s == "stderr") == "err supersecr"  # a prefix only, at the end
    assert not any("supersecret" in t for _, t in seen)


# --- a real run ------------------------------------------------------------------------------------


def test_it_gives_only_visible_secrets_to_the_sandbox_and_scrubs_every_output(
    run_settings, team, owner, tmp_path, caplog
):
    repo = repo_with_setup(tmp_path, 'echo "setup sees $VISIBLE_TOKEN"\n')
    environment = Environment.objects.create(team=team, name="env", env_vars={"PLAIN": "plain-value"})
    environment.change_secrets(
        {
            "VISIBLE_TOKEN": {"value": VISIBLE, "sandbox_visible": True},
            "HIDDEN_TOKEN": {"value": HIDDEN, "sandbox_visible": False},
        }
    )
    assert environment.revision == 2
    assert all(VISIBLE not in c and HIDDEN not in c for c in stored_ciphertexts())

    script = {
        "responses": [
            {
                "tool_calls": [
                    call("bash", command='echo "v=$VISIBLE_TOKEN h=${HIDDEN_TOKEN:-unset} p=$PLAIN"')
                ]
            },
            {"tool_calls": [call("bash", command='printf "%s" "$VISIBLE_TOKEN" > leaked.txt && env')]},
            {"tool_calls": [call("read_file", path="leaked.txt")]},
            {"tool_calls": [call("finish", summary="done")]},
        ]
    }
    repository = Repository.objects.create(team=team, name="r", url=str(repo), provider="local")
    session = start_session(
        team=team,
        repository=repository,
        environment=environment,
        prompt="Go",
        model="scripted/demo",
        created_by=owner,
    )
    assert session.environment_revision == 2
    caplog.set_level(logging.DEBUG)
    with start_in_thread(script) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
        model_saw = json.dumps(fake.requests)
    run = session.runs.get()
    assert run.status == Run.Status.COMPLETED, run.error

    outputs = [
        e.payload["output"] for e in Event.objects.filter(run=run, type="tool_finished").order_by("seq")
    ]
    # The sandbox had the visible one (redacted on the way out), not the hidden one.
    assert "v=[secret VISIBLE_TOKEN] h=unset p=plain-value" in outputs[0]
    assert "VISIBLE_TOKEN=[secret VISIBLE_TOKEN]" in outputs[1] and "HIDDEN_TOKEN" not in outputs[1]
    assert outputs[2].strip().endswith("[secret VISIBLE_TOKEN]")
    setup = "".join(e.payload["text"] for e in Event.objects.filter(run=run, type="setup_output"))
    assert "setup sees [secret VISIBLE_TOKEN]" in setup

    diff = Artifact.objects.get(run=run, kind="diff")
    with diff.file.open("rb") as fh:
        diff_text = fh.read().decode()
    assert "+[secret VISIBLE_TOKEN]" in diff_text

    everything = [model_saw, diff_text, caplog.text]
    everything += [
        json.dumps(p) for p in Event.objects.filter(session=session).values_list("payload", flat=True)
    ]
    for artifact in Artifact.objects.filter(session=session):
        with artifact.file.open("rb") as fh:
            everything.append(fh.read().decode(errors="replace"))
    for text in everything:
        assert VISIBLE not in text and HIDDEN not in text


def test_it_fails_the_run_clearly_when_a_secret_cannot_be_decrypted(run_settings, team, owner, tmp_path):
    repo = repo_with_setup(tmp_path, "true\n")
    environment = Environment.objects.create(team=team, name="env")
    environment.change_secrets({"API_TOKEN": {"value": VISIBLE, "sandbox_visible": True}})
    run_settings.SECRETS_KEYS = ["a key the secret was not written with"]
    repository = Repository.objects.create(team=team, name="r", url=str(repo), provider="local")
    session = start_session(
        team=team, repository=repository, environment=environment, prompt="Go", model="x/y", created_by=owner
    )
    execute(session.runs.get().pk)
    run = session.runs.get()
    assert run.status == Run.Status.FAILED
    assert "Cannot decrypt secret API_TOKEN of environment 'env'" in run.error
    assert not session.sandboxes.exists()  # failed before anything was created


# --- rotation --------------------------------------------------------------------------------------


def test_it_reencrypts_every_secret_under_the_new_key(settings, team):
    settings.SECRETS_KEYS = ["old"]
    environment = Environment.objects.create(team=team, name="env")
    environment.change_secrets({"A_TOKEN": {"value": VISIBLE}, "B_TOKEN": {"value": HIDDEN}})
    revision = Environment.objects.get(pk=environment.pk).revision
    settings.SECRETS_KEYS = ["new", "old"]
    call_command("reencrypt_secrets")
    settings.SECRETS_KEYS = ["new"]
    values = {s.name: s.value for s in Environment.objects.get(pk=environment.pk).decrypted_secrets()}
    assert values == {"A_TOKEN": VISIBLE, "B_TOKEN": HIDDEN}
    assert Environment.objects.get(pk=environment.pk).revision == revision  # not an edit


def test_it_changes_nothing_when_one_secret_has_an_unknown_key(settings, team):
    settings.SECRETS_KEYS = ["old"]
    environment = Environment.objects.create(team=team, name="env")
    environment.change_secrets({"A_TOKEN": {"value": VISIBLE}})
    settings.SECRETS_KEYS = ["other"]
    environment.change_secrets({"B_TOKEN": {"value": HIDDEN}})
    before = sorted(stored_ciphertexts())
    with pytest.raises(CommandError, match="A_TOKEN"):
        call_command("reencrypt_secrets")
    assert sorted(stored_ciphertexts()) == before


@pytest.mark.django_db(transaction=True)
def test_the_cli_reports_an_unknown_key_in_one_line(team, tmp_path):
    environment = Environment.objects.create(team=team, name="env")
    environment.change_secrets({"API_TOKEN": {"value": VISIBLE}})
    env = child_env(tmp_path)
    wrong = deputies("secrets", "reencrypt", env={**env, "DEPUTIES_SECRETS_KEY": "not the key"})
    assert wrong.returncode == 2, wrong.stderr
    assert "API_TOKEN" in wrong.stderr and "Traceback" not in wrong.stderr
    right = deputies("secrets", "reencrypt", env=env)  # child_env passes the test's keys on
    assert right.returncode == 0, right.stderr
    assert "Re-encrypted 1 secret(s)" in right.stdout


# --- REST API --------------------------------------------------------------------------------------


def test_it_accepts_secrets_and_never_returns_their_values(owner, team):
    response = client_for(owner).post(
        URL,
        {
            "name": "ci",
            "team": team.slug,
            "secrets": {
                "NPM_TOKEN": {"value": VISIBLE, "sandbox_visible": True},
                "DEPLOY_KEY": {"value": HIDDEN},
            },
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    assert VISIBLE.encode() not in response.content and HIDDEN.encode() not in response.content
    body = response.json()
    assert body["revision"] == 1
    assert [(s["name"], s["sandbox_visible"]) for s in body["secrets"]] == [
        ("DEPLOY_KEY", False),
        ("NPM_TOKEN", True),
    ]
    assert all(VISIBLE not in c and HIDDEN not in c for c in stored_ciphertexts())

    url = f"{URL}{body['id']}/"
    listed = client_for(owner).get(URL)
    assert VISIBLE.encode() not in listed.content

    flagged = client_for(owner).patch(
        url, {"secrets": {"DEPLOY_KEY": {"sandbox_visible": True}}}, format="json"
    )
    assert flagged.status_code == 200, flagged.content
    assert flagged.json()["revision"] == 2
    assert {s["name"]: s["sandbox_visible"] for s in flagged.json()["secrets"]}["DEPLOY_KEY"] is True
    values = {s.name: s.value for s in Environment.objects.get(pk=body["id"]).decrypted_secrets()}
    assert values == {"NPM_TOKEN": VISIBLE, "DEPLOY_KEY": HIDDEN}

    deleted = client_for(owner).patch(url, {"secrets": {"NPM_TOKEN": None}}, format="json")
    assert [s["name"] for s in deleted.json()["secrets"]] == ["DEPLOY_KEY"]
    assert deleted.json()["revision"] == 3


@pytest.mark.parametrize(
    "secrets, problem",
    [
        ({"1BAD": {"value": VISIBLE}}, "not a valid environment variable name"),
        ({"TOKEN": {"value": "short"}}, "shorter than 6 characters"),
        ({"TOKEN": {"value": 12345678}}, "must be a string"),
        ({"TOKEN": {"value": VISIBLE, "visible": True}}, "Expected"),
        ({"TOKEN": {"value": VISIBLE, "sandbox_visible": "yes"}}, "true or false"),
        ({"TOKEN": {"sandbox_visible": True}}, "needs a value"),
        ({"PLAIN": {"value": VISIBLE}}, "also a plain variable"),
        (["TOKEN"], "Expected an object"),
    ],
)
def test_it_rejects_bad_secrets_naming_the_field_and_writes_nothing(owner, team, secrets, problem):
    response = client_for(owner).post(
        URL,
        {"name": "ci", "team": team.slug, "env_vars": {"PLAIN": "x"}, "secrets": secrets},
        format="json",
    )
    assert response.status_code == 400, response.content
    body = response.json()
    assert "secrets" in json.dumps(body) and problem in json.dumps(body)
    assert VISIBLE not in json.dumps(body)
    assert not Environment.objects.exists() and not EnvironmentSecret.objects.exists()


def test_viewers_cannot_set_secrets_and_outsiders_cannot_see_them(viewer, outsider, team):
    environment = Environment.objects.create(team=team, name="env")
    environment.change_secrets({"TOKEN": {"value": VISIBLE}})
    url = f"{URL}{environment.pk}/"
    assert client_for(viewer).patch(url, {"secrets": {"TOKEN": None}}, format="json").status_code == 403
    assert [s["name"] for s in client_for(viewer).get(url).json()["secrets"]] == ["TOKEN"]
    assert client_for(outsider).get(url).status_code == 404
    assert EnvironmentSecret.objects.count() == 1


# --- admin -----------------------------------------------------------------------------------------


def test_the_admin_sets_a_secret_write_only_and_bumps_the_revision(admin_client, team):
    environment = Environment.objects.create(team=team, name="env")
    url = f"/admin/agent_sessions/environment/{environment.pk}/change/"
    form = {
        "team": team.pk,
        "name": "env",
        "image": "",
        "setup_script": "",
        "env_vars": "{}",
        "sandbox_provider": "",
        "network_policy": "none",
        "timeout_seconds": 3600,
        "default_model": "",
        "secrets-TOTAL_FORMS": 1,
        "secrets-INITIAL_FORMS": 0,
        "secrets-0-name": "API_TOKEN",
        "secrets-0-value": VISIBLE,
        "secrets-0-sandbox_visible": "on",
    }
    response = admin_client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:3000]
    environment.refresh_from_db()
    assert environment.revision == 2
    assert [(s.name, s.value, s.sandbox_visible) for s in environment.decrypted_secrets()] == [
        ("API_TOKEN", VISIBLE, True)
    ]
    page = admin_client.get(url)
    assert VISIBLE.encode() not in page.content and b"API_TOKEN" in page.content

    secret = EnvironmentSecret.objects.get()
    keep = {
        **form,
        "secrets-INITIAL_FORMS": 1,
        "secrets-0-id": secret.pk,
        "secrets-0-environment": environment.pk,
        "secrets-0-value": "",
    }
    keep.pop("secrets-0-sandbox_visible")  # only the flag changes; an empty value keeps the old one
    assert admin_client.post(url, keep).status_code == 302
    environment.refresh_from_db()
    assert [(s.value, s.sandbox_visible) for s in environment.decrypted_secrets()] == [(VISIBLE, False)]
    assert environment.revision == 3

    short = {**keep, "secrets-0-value": "abc"}
    response = admin_client.post(url, short)
    assert response.status_code == 200 and b"At least 6 characters" in response.content


def test_secret_rows_never_print_their_value(team):
    environment = Environment.objects.create(team=team, name="env")
    environment.change_secrets({"TOKEN": {"value": VISIBLE}})
    secret = EnvironmentSecret.objects.get()
    assert VISIBLE not in str(secret) and VISIBLE not in repr(secret)

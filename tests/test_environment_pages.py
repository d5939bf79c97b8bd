"""The environment pages with the Django test client: who sees and changes what, the form going
through the API's serializer (same rules, same words, errors at the field), and secret values that go
in and never come back out."""

from __future__ import annotations

import html as html_module
import re

import pytest
from django.test import Client
from django.urls import reverse

from sessions.models import Environment, EnvironmentSecret, Membership, Role, Team
from sessions.secrets import decrypt
from tests.conftest import client_for

TOKEN = "tok-page-9d2f61c4a7"
PASSWORD = "pw-db-03be7f5519"
NEWER = "tok-newer-5be0a3d1c2"
LIST = "/environments"
NEW = "/environments/new"


@pytest.fixture(autouse=True)
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.DEFAULT_MODEL = "scripted/demo"


@pytest.fixture
def environment(team) -> Environment:
    environment = Environment.objects.create(
        team=team, name="python", image="python:3.12-slim", env_vars={"LOG_LEVEL": "debug"}
    )
    environment.change_secrets(
        {"API_TOKEN": {"value": TOKEN, "sandbox_visible": True}, "DB_PASSWORD": {"value": PASSWORD}},
        new_revision=False,
    )
    return environment


def browser(user=None, **kwargs) -> Client:
    client = Client(**kwargs)
    if user is not None:
        client.force_login(user)
    return client


def page_of(environment: Environment) -> str:
    return reverse("environment-detail", args=[environment.pk])


def form_data(**overrides) -> dict[str, str]:
    data = {
        "name": "python",
        "image": "python:3.12-slim",
        "setup_script": "pip install -e .\r\npytest -q\r\n",
        "env_vars": "LOG_LEVEL=debug\r\nPIP_INDEX_URL=https://pypi.example.com/simple",
        "sandbox_provider": "docker",
        "network_policy": "bridge",
        "cpu_limit": "1.5",
        "memory_mb": "2048",
        "timeout_seconds": "1800",
        "idle_ttl_seconds": "",
        "default_model": "scripted/demo",
        "new-count": "2",
        "new-1-name": "API_TOKEN",
        "new-1-value": TOKEN,
        "new-1-visible": "1",
        "new-2-name": "",
        "new-2-value": "",
    }
    data.update(overrides)
    return data


def edit_data(environment: Environment, **overrides) -> dict[str, str]:
    """What the edit page posts when nothing is touched: the stored values and every secret row."""
    data = {
        "name": environment.name,
        "image": environment.image,
        "setup_script": environment.setup_script,
        "env_vars": "\n".join(f"{k}={v}" for k, v in environment.env_vars.items()),
        "sandbox_provider": environment.sandbox_provider,
        "network_policy": environment.network_policy,
        "cpu_limit": "" if environment.cpu_limit is None else str(environment.cpu_limit),
        "memory_mb": "" if environment.memory_mb is None else str(environment.memory_mb),
        "timeout_seconds": str(environment.timeout_seconds),
        "idle_ttl_seconds": "" if environment.idle_ttl_seconds is None else str(environment.idle_ttl_seconds),
        "default_model": environment.default_model,
        "revision": str(environment.revision),
        "new-count": "2",
    }
    for secret in environment.secrets.all():
        data[f"secret-{secret.name}-shown"] = "1"
        if secret.sandbox_visible:
            data[f"secret-{secret.name}-visible"] = "1"
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def error_at(html: str, field_id: str) -> str:
    """The text of the error shown at one field (``id_name``, ``new-1``, ``secret-API_TOKEN``)."""
    match = re.search(
        rf'<div class="field-error" id="{re.escape(field_id)}_?-?error">(.*?)</div>', html, re.S
    )
    assert match, f"no error at {field_id}"
    return html_module.unescape(re.sub(r"<[^>]+>", " ", match.group(1)).strip())


def assert_no_secret_values(response) -> None:
    body = response.content.decode()
    for value in (TOKEN, PASSWORD, NEWER):
        assert value not in body


# --- anonymous, outsiders and viewers ----------------------------------------------------------------


def test_it_sends_anonymous_visitors_to_the_login_page(environment):
    client = browser()
    for url in (LIST, NEW, page_of(environment)):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"] == f"/login?next={url}"
    assert client.post(page_of(environment), edit_data(environment, image="x")).status_code == 302
    assert client.post(NEW, form_data(name="other")).status_code == 302
    assert Environment.objects.get(pk=environment.pk).image == "python:3.12-slim"
    assert Environment.objects.count() == 1


def test_it_hides_environments_from_outsiders_with_a_404(environment, outsider):
    client = browser(outsider)
    listing = client.get(LIST)
    assert listing.status_code == 200 and b"python:3.12-slim" not in listing.content
    assert b"No environments yet" in listing.content
    assert client.get(page_of(environment)).status_code == 404
    response = client.post(page_of(environment), edit_data(environment, image="evil:latest"))
    assert response.status_code == 404
    assert client.get("/environments/999999").status_code == 404
    environment.refresh_from_db()
    assert environment.image == "python:3.12-slim" and environment.revision == 1


def test_it_shows_a_viewer_the_environment_read_only_and_refuses_their_posts(environment, viewer):
    client = browser(viewer)
    listing = client.get(LIST).content.decode()
    assert page_of(environment) in listing and "New environment" not in listing
    page = client.get(page_of(environment))
    html = page.content.decode()
    assert page.status_code == 200
    assert 'method="post" class="card' not in html and "Save changes" not in html
    assert "read-only (viewer) access" in html
    assert "API_TOKEN" in html and "DB_PASSWORD" in html and "LOG_LEVEL=debug" in html
    assert_no_secret_values(page)
    response = client.post(page_of(environment), edit_data(environment, image="evil:latest"))
    assert response.status_code == 403
    new = client.get(NEW)
    assert new.status_code == 200 and b"You cannot create environments" in new.content
    assert client.post(NEW, form_data(name="other")).status_code == 403
    environment.refresh_from_db()
    assert environment.image == "python:3.12-slim" and environment.revision == 1
    assert Environment.objects.count() == 1


def test_it_refuses_a_post_without_the_csrf_token(environment, owner):
    client = browser(owner, enforce_csrf_checks=True)
    assert client.post(page_of(environment), edit_data(environment, image="x")).status_code == 403
    assert client.post(NEW, form_data(name="other")).status_code == 403
    assert Environment.objects.get(pk=environment.pk).image == "python:3.12-slim"


# --- the list ------------------------------------------------------------------------------------------


def test_it_invites_a_writer_to_create_the_first_environment(owner):
    page = browser(owner).get(LIST).content.decode()
    assert "No environments yet" in page and f'href="{NEW}"' in page
    assert 'href="/environments" aria-current="page">Environments</a>' in page


def test_it_lists_the_environments_of_the_users_teams(environment, owner, other_team):
    Environment.objects.create(team=other_team, name="theirs")
    page = browser(owner).get(LIST).content.decode()
    row = re.search(rf'<tr data-environment-id="{environment.pk}">(.*?)</tr>', page, re.S).group(1)
    for text in (
        "python",
        "Alpha",
        "r1",
        "python:3.12-slim",
        "default (local)",
        "none",
        "any CPU",
        "1h per run",
        "default (30m)",
    ):
        assert text in row, text
    assert '<td data-label="Secrets" data-field="secrets">2</td>' in row
    assert "theirs" not in page
    assert_no_secret_values(browser(owner).get(LIST))


# --- creating ------------------------------------------------------------------------------------------


def test_it_creates_an_environment_with_secrets_stored_encrypted(owner, team):
    client = browser(owner)
    form = client.get(NEW)
    assert form.status_code == 200 and b'name="csrfmiddlewaretoken"' in form.content
    response = client.post(NEW, form_data(**{"new-2-name": "DB_PASSWORD", "new-2-value": PASSWORD}))
    environment = Environment.objects.get()
    assert response.status_code == 302 and response["Location"] == page_of(environment)
    assert environment.team == team and environment.revision == 1
    assert environment.env_vars == {"LOG_LEVEL": "debug", "PIP_INDEX_URL": "https://pypi.example.com/simple"}
    assert environment.setup_script == "pip install -e .\npytest -q\n"  # kept as typed, as the API does
    assert (environment.sandbox_provider, environment.network_policy) == ("docker", "bridge")
    assert (environment.cpu_limit, environment.memory_mb, environment.timeout_seconds) == (1.5, 2048, 1800)
    assert environment.idle_ttl_seconds is None and environment.default_model == "scripted/demo"
    secrets = {s.name: s for s in EnvironmentSecret.objects.filter(environment=environment)}
    assert set(secrets) == {"API_TOKEN", "DB_PASSWORD"}
    assert secrets["API_TOKEN"].sandbox_visible and not secrets["DB_PASSWORD"].sandbox_visible
    for secret, value in ((secrets["API_TOKEN"], TOKEN), (secrets["DB_PASSWORD"], PASSWORD)):
        assert value not in secret.ciphertext and decrypt(secret.ciphertext) == value
    page = client.get(response["Location"])
    html = page.content.decode()
    assert "Environment python created (revision 1)." in html and "revision 1" in html
    assert 'id="secret-API_TOKEN-visible" name="secret-API_TOKEN-visible" value="1" checked' in html
    assert 'id="secret-DB_PASSWORD-visible" name="secret-DB_PASSWORD-visible" value="1">' in html
    assert_no_secret_values(page)


def test_it_asks_which_team_when_the_user_writes_in_several(owner, team):
    second = Team.objects.create(name="Gamma", slug="gamma")
    Membership.objects.create(team=second, user=owner, role=Role.MEMBER)
    client = browser(owner)
    assert b'<option value="gamma">Gamma</option>' in client.get(NEW).content
    response = client.post(NEW, form_data())
    assert response.status_code == 400
    assert "This field is required: you can write in more than one team" in error_at(
        response.content.decode(), "id_team"
    )
    assert_no_secret_values(response)
    assert client.post(NEW, form_data(team="gamma")).status_code == 302
    assert Environment.objects.get().team == second


# --- editing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["owner", "teammate"])
def test_it_edits_fields_and_secrets_as_a_new_revision(request, environment, who):
    client = browser(request.getfixturevalue(who))
    form = client.get(page_of(environment))
    assert b"revision 1" in form.content and b"LOG_LEVEL=debug" in form.content
    assert_no_secret_values(form)
    before = {s.name: s.ciphertext for s in environment.secrets.all()}
    data = edit_data(
        environment,
        image="python:3.13-slim",
        env_vars="LOG_LEVEL=info\n# a comment\n\nFEATURE_X=on",
        memory_mb="4096",
        **{
            "secret-API_TOKEN-visible": None,  # re-flag: no longer given to the sandbox
            "secret-DB_PASSWORD-remove": "1",
            "new-1-name": "SENTRY_DSN",
            "new-1-value": NEWER,
        },
    )
    response = client.post(page_of(environment), data)
    assert response.status_code == 302 and response["Location"] == page_of(environment)
    environment.refresh_from_db()
    assert environment.revision == 2 and environment.image == "python:3.13-slim"
    assert environment.env_vars == {"LOG_LEVEL": "info", "FEATURE_X": "on"} and environment.memory_mb == 4096
    secrets = {s.name: s for s in environment.secrets.all()}
    assert set(secrets) == {"API_TOKEN", "SENTRY_DSN"}
    assert not secrets["API_TOKEN"].sandbox_visible and secrets["API_TOKEN"].ciphertext == before["API_TOKEN"]
    assert (
        NEWER not in secrets["SENTRY_DSN"].ciphertext and decrypt(secrets["SENTRY_DSN"].ciphertext) == NEWER
    )
    page = client.get(page_of(environment))
    assert (
        b"Saved as revision 2." in page.content and b'id="environment-revision">revision 2<' in page.content
    )
    assert_no_secret_values(page)

    # Replacing a value: a new ciphertext, the flag as ticked.
    data = edit_data(environment, **{"secret-API_TOKEN-value": NEWER, "secret-API_TOKEN-visible": "1"})
    assert client.post(page_of(environment), data).status_code == 302
    secret = environment.secrets.get(name="API_TOKEN")
    assert decrypt(secret.ciphertext) == NEWER and secret.sandbox_visible
    assert Environment.objects.get(pk=environment.pk).revision == 3


def test_it_keeps_the_revision_when_nothing_changed(environment, owner):
    client = browser(owner)
    response = client.post(page_of(environment), edit_data(environment), follow=True)
    assert b"Nothing changed; still revision 1." in response.content
    environment.refresh_from_db()
    assert environment.revision == 1
    assert {s.name: decrypt(s.ciphertext) for s in environment.secrets.all()} == {
        "API_TOKEN": TOKEN,
        "DB_PASSWORD": PASSWORD,
    }


def test_it_refuses_to_overwrite_a_revision_saved_since_the_page_was_opened(environment, owner):
    client = browser(owner)
    stale = edit_data(environment, image="mine:1")
    Environment.objects.get(pk=environment.pk).save()  # someone else saves revision 2
    response = client.post(page_of(environment), stale)
    html = response.content.decode()
    assert response.status_code == 400 and "Someone saved revision 2" in html
    assert 'name="revision" value="2"' in html and 'value="mine:1"' in html
    assert Environment.objects.get(pk=environment.pk).image == "python:3.12-slim"
    assert client.post(page_of(environment), {**stale, "revision": "2"}).status_code == 302
    assert Environment.objects.get(pk=environment.pk).image == "mine:1"


def test_it_leaves_a_secret_added_elsewhere_alone(environment, owner):
    data = edit_data(environment, image="python:3.13-slim")
    environment.change_secrets({"LATE": {"value": NEWER, "sandbox_visible": True}})
    data["revision"] = str(Environment.objects.get(pk=environment.pk).revision)
    assert browser(owner).post(page_of(environment), data).status_code == 302
    assert environment.secrets.get(name="LATE").sandbox_visible  # not posted, so not un-ticked


# --- validation: the serializer's rules and words, at the field, nothing written ----------------------


def test_it_shows_the_serializers_errors_at_each_field_and_writes_nothing(environment, owner):
    client = browser(owner)
    data = edit_data(
        environment,
        name="",
        env_vars="LOG_LEVEL=info\n1BAD=x",
        cpu_limit="lots",
        memory_mb="8",
        sandbox_provider="kubernetes",
        default_model="nowhere/model",
        **{
            "secret-API_TOKEN-value": NEWER,
            "secret-DB_PASSWORD-remove": "1",
            "new-1-name": "SHORT",
            "new-1-value": "abc",
            "new-2-name": "",
            "new-2-value": PASSWORD,
        },
    )
    response = client.post(page_of(environment), data)
    html = response.content.decode()
    assert response.status_code == 400
    assert "Please fix the fields marked below." in html
    api = client_for(owner).patch(
        f"/api/v1/environments/{environment.pk}/",
        {
            "name": "",
            "env_vars": {"LOG_LEVEL": "info", "1BAD": "x"},
            "cpu_limit": "lots",
            "memory_mb": "8",
            "sandbox_provider": "kubernetes",
            "default_model": "nowhere/model",
            "secrets": {"SHORT": {"value": "abc"}},
        },
        format="json",
    )
    assert api.status_code == 400
    expected = api.json()["errors"]
    for name in ("name", "env_vars", "cpu_limit", "memory_mb", "sandbox_provider", "default_model"):
        assert error_at(html, f"id_{name}") == expected[name][0], name
    assert error_at(html, "new-1") == expected["secrets"]["SHORT"][0]
    assert error_at(html, "new-2") == "Give this secret a name."
    textarea = re.search(r'<textarea[^>]*id="id_env_vars"[^>]*>', html).group(0)
    assert 'aria-invalid="true"' in textarea and "id_env_vars_error" in textarea
    # What was typed comes back (names, flags, fields) except secret values, which are retyped.
    assert 'value="SHORT"' in html and "Secret values are never shown again" in html
    assert 'id="secret-DB_PASSWORD-remove" name="secret-DB_PASSWORD-remove" value="1" checked' in html
    assert_no_secret_values(response)
    assert not [tag for tag in re.findall(r'<input type="password"[^>]*>', html) if "value=" in tag]
    environment.refresh_from_db()
    assert environment.revision == 1 and environment.env_vars == {"LOG_LEVEL": "debug"}
    assert {s.name: decrypt(s.ciphertext) for s in environment.secrets.all()} == {
        "API_TOKEN": TOKEN,
        "DB_PASSWORD": PASSWORD,
    }


def test_it_reports_unparseable_lines_and_clashes_with_secrets(environment, owner):
    client = browser(owner)
    response = client.post(
        page_of(environment), edit_data(environment, env_vars="LOG_LEVEL=debug\nnot a pair\nLOG_LEVEL=x")
    )
    assert response.status_code == 400
    assert error_at(response.content.decode(), "id_env_vars") == (
        "Line 2: expected KEY=value.  Line 3: LOG_LEVEL is already set on line 1."
    )
    response = client.post(page_of(environment), edit_data(environment, env_vars="API_TOKEN=plain"))
    assert response.status_code == 400
    assert error_at(response.content.decode(), "secrets") == (
        "API_TOKEN: also a plain variable in env_vars; use one."
    )
    response = client.post(page_of(environment), edit_data(environment, **{"new-1-name": "API_TOKEN"}))
    assert (
        error_at(response.content.decode(), "new-1") == "API_TOKEN already exists: replace its value above."
    )
    assert Environment.objects.get(pk=environment.pk).revision == 1


def test_it_refuses_a_name_taken_in_the_team_and_a_new_secret_without_a_value(environment, owner):
    response = browser(owner).post(NEW, form_data(**{"new-1-value": ""}))
    html = response.content.decode()
    assert response.status_code == 400
    assert error_at(html, "id_name") == "An environment named 'python' already exists in team 'alpha'."
    response = browser(owner).post(NEW, form_data(name="fresh", **{"new-1-value": ""}))
    assert error_at(response.content.decode(), "new-1") == "A new secret needs a value."
    assert Environment.objects.count() == 1


@pytest.mark.parametrize(
    ("isolation", "says"),
    [
        ("none", "Not enforced: the local provider cannot restrict the network on this host"),
        ("bwrap", "Enforced by the local provider."),
    ],
)
def test_it_says_next_to_the_network_field_whether_the_provider_enforces_it(settings, owner, isolation, says):
    settings.SANDBOX_PROVIDER, settings.SANDBOX_ISOLATION = "local", isolation
    html = browser(owner).get(reverse("environment-new")).content.decode()
    hint = re.search(r'id="id_network_policy_helptext">([^<]*)<', html).group(1)
    assert says in html_module.unescape(hint)
    assert "data-unenforced=" in html and "environment.js" in html

"""The dashboard pages with the Django test client: who sees what, the forms, and what each page shows."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from sandboxes.models import Sandbox
from sessions.artifacts import store_artifact
from sessions.events import emit, emit_many
from sessions.models import (
    Environment,
    LLMCall,
    Message,
    Repository,
    Run,
    Session,
    SessionStatus,
    Source,
    start_session,
)
from sessions.web.diff import parse_diff

DIFF = """\
diff --git a/calc.py b/calc.py
index 1111111..2222222 100644
--- a/calc.py
+++ b/calc.py
@@ -1,4 +1,4 @@
 def add(a, b):
-    return a - b
+    return a + b
 # the end
diff --git a/CHANGELOG.md b/CHANGELOG.md
new file mode 100644
index 0000000..3333333
--- /dev/null
+++ b/CHANGELOG.md
@@ -0,0 +1,2 @@
+- Fixed add().
+- <script>alert(1)</script>
"""


@pytest.fixture(autouse=True)
def providers(settings, tmp_path):
    settings.LLM_PROVIDERS = {
        "scripted": {
            "kind": "openai",
            "base_url": "http://user:pw@127.0.0.1:9/v1",
            "api_key": "sk-secret-key",
        }
    }
    settings.DEFAULT_MODEL = "scripted/demo"
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def session(team, owner, repository) -> Session:
    return start_session(
        team=team, repository=repository, prompt="Fix the adder", model="scripted/demo", created_by=owner
    )


def browser(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def page_of(session: Session) -> str:
    return reverse("session-detail", args=[session.pk])


def a_worked_session(session: Session) -> Session:
    """A session with one run's worth of events, a diff and a not-isolated sandbox."""
    run = session.runs.get()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING)
    Sandbox.objects.create(
        session=session, provider="local", isolated=False, isolation_note="bubblewrap is not installed"
    )
    emit_many(
        session.pk,
        [
            ("run_started", {"run_id": run.pk, "attempt": 1}),
            ("status", {"status": "running"}),
            (
                "sandbox_ready",
                {"sandbox_id": "s1", "provider": "local", "isolated": False, "reason": "no bwrap"},
            ),
            ("assistant_text", {"text": "I will run the tests first."}),
            (
                "tool_started",
                {"call_id": "c1", "name": "bash", "arguments": {"command": "python3 -m unittest"}},
            ),
            (
                "tool_finished",
                {"call_id": "c1", "name": "bash", "ok": False, "output": "FAILED (failures=1)"},
            ),
            ("todo", {"todos": [{"content": "Fix add()", "status": "in_progress"}]}),
            ("progress", {"message": "Fixed add(); re-running the tests"}),
            ("llm_error", {"error": "HTTP 500 from the model", "attempt": 1, "will_retry": True}),
            (
                "usage",
                {
                    "input_tokens": 900,
                    "output_tokens": 40,
                    "cached_tokens": 0,
                    "cost_usd": "0.003",
                    "model": "x",
                },
            ),
        ],
        run_id=run.pk,
    )
    store_artifact(session.pk, "diff", f"session-{session.pk}-run-1.diff", DIFF, run_id=run.pk)
    session.add_usage(900, 40, 0, Decimal("0.003"))
    return session


# --- anonymous, outsiders and viewers --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["session-list", "session-new", "usage", "setup"])
def test_it_sends_anonymous_visitors_to_the_login_page(db, name):
    response = browser().get(reverse(name))
    assert response.status_code == 302
    assert response["Location"] == f"/login?next={reverse(name)}"


def test_it_sends_anonymous_visitors_of_a_session_to_the_login_page(session):
    response = browser().get(page_of(session))
    assert response.status_code == 302 and response["Location"].startswith("/login?next=")
    assert browser().post(reverse("session-cancel", args=[session.pk])).status_code == 302
    assert Session.objects.get(pk=session.pk).status == SessionStatus.QUEUED


def test_it_logs_in_and_out_with_the_login_page(owner):
    client = Client()
    page = client.get("/login")
    assert page.status_code == 200 and b'name="username"' in page.content
    wrong = client.post("/login", {"username": "owner", "password": "nope"})
    assert wrong.status_code == 200 and b"error-box" in wrong.content
    ok = client.post("/login", {"username": "owner", "password": "pw-owner"})
    assert ok.status_code == 302 and ok["Location"] == "/"
    assert client.get("/").status_code == 200
    out = client.post("/logout")
    assert out.status_code == 302 and out["Location"] == "/login"
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("who", ["owner", "teammate", "viewer"])
def test_it_shows_the_session_to_everyone_in_its_team(request, session, who):
    user = request.getfixturevalue(who)
    client = browser(user)
    assert session.title.encode() in client.get("/").content
    page = client.get(page_of(session))
    assert page.status_code == 200
    assert b"Fix the adder" in page.content
    assert client.get(reverse("session-diff", args=[session.pk])).status_code == 200


def test_it_hides_a_session_from_outsiders_with_a_404(session, outsider):
    client = browser(outsider)
    assert b"Fix the adder" not in client.get("/").content
    for url in (page_of(session), reverse("session-diff", args=[session.pk])):
        response = client.get(url)
        assert response.status_code == 404
        assert b"Not found" in response.content
    for action in ("session-message", "session-cancel", "session-archive"):
        response = client.post(reverse(action, args=[session.pk]), {"content": "hi"})
        assert response.status_code == 404
    assert Session.objects.get(pk=session.pk).status == SessionStatus.QUEUED
    assert session.messages.count() == 1


def test_it_answers_404_for_a_session_that_does_not_exist(owner):
    assert browser(owner).get("/sessions/999999").status_code == 404


def test_it_lets_a_viewer_read_but_not_write(session, viewer):
    client = browser(viewer)
    page = client.get(page_of(session)).content.decode()
    assert 'id="followup"' not in page and 'id="cancel-form"' not in page and 'id="archive-form"' not in page
    assert "read-only access" in page
    assert client.post(reverse("session-message", args=[session.pk]), {"content": "hi"}).status_code == 403
    assert client.post(reverse("session-cancel", args=[session.pk])).status_code == 403
    assert client.post(reverse("session-archive", args=[session.pk])).status_code == 403
    assert session.messages.count() == 1
    assert Session.objects.get(pk=session.pk).status == SessionStatus.QUEUED
    new = client.get(reverse("session-new"))
    assert new.status_code == 200 and b"You cannot start sessions" in new.content
    post = client.post(reverse("session-new"), {"repository": session.repository_id, "prompt": "x"})
    assert post.status_code == 403
    assert Session.objects.count() == 1


# --- sessions list ----------------------------------------------------------------------------------------


def test_it_shows_an_empty_state_with_no_sessions(owner):
    page = browser(owner).get("/").content.decode()
    assert "No sessions yet — start one" in page
    assert reverse("session-new") in page


def test_it_lists_sessions_with_their_details(session, owner):
    Session.objects.filter(pk=session.pk).update(cost_usd=Decimal("0.0123"))
    page = browser(owner).get("/").content.decode()
    assert 'class="badge status-queued"' in page
    assert "sample" in page  # repository
    assert ">api<" in page and ">owner<" in page  # source and creator
    assert "$0.0123" in page
    assert f'data-session-id="{session.pk}"' in page


def test_it_filters_the_list(team, owner, teammate, repository, django_capture_on_commit_callbacks):
    other_repo = Repository.objects.create(team=team, name="other", url="/srv/other", provider="local")
    mine = start_session(team=team, repository=repository, prompt="Alpha task", model="m/x", created_by=owner)
    theirs = start_session(
        team=team,
        repository=other_repo,
        prompt="Beta task",
        model="m/x",
        created_by=teammate,
        source=Source.SLACK,
    )
    Session.objects.filter(pk=theirs.pk).update(status=SessionStatus.COMPLETED)
    client = browser(owner)

    def titles(query: str) -> set[str]:
        page = client.get("/?" + query).content.decode()
        return {t for t in ("Alpha task", "Beta task") if t in page}

    assert titles("") == {"Alpha task", "Beta task"}
    assert titles("status=completed") == {"Beta task"}
    assert titles(f"repository={other_repo.pk}") == {"Beta task"}
    assert titles("source=slack") == {"Beta task"}
    assert titles("mine=1") == {"Alpha task"}
    assert titles("search=alpha") == {"Alpha task"}
    assert mine.pk
    bad = client.get("/?status=bogus")
    assert bad.status_code == 200 and b"Expected one of" in bad.content
    assert b"No sessions match these filters" in client.get("/?search=nothing-like-this").content


def test_it_hides_archived_sessions_unless_asked(session, owner):
    Session.objects.filter(pk=session.pk).update(status=SessionStatus.ARCHIVED)
    client = browser(owner)
    assert b"Fix the adder" not in client.get("/").content
    assert b"Fix the adder" in client.get("/?status=archived").content


def test_it_paginates_the_list(team, owner, repository):
    for n in range(30):
        start_session(
            team=team, repository=repository, prompt=f"Task number {n:02d}", model="m/x", created_by=owner
        )
    client = browser(owner)
    first = client.get("/").content.decode()
    assert "Task number 29" in first and "Task number 04" not in first
    assert "Page 1 of 2" in first
    second = client.get("/?page=2").content.decode()
    assert "Task number 04" in second and "Task number 29" not in second


# --- new session -----------------------------------------------------------------------------------------


def test_it_starts_a_session_from_the_form(owner, repository, django_capture_on_commit_callbacks):
    client = browser(owner)
    form = client.get(reverse("session-new")).content.decode()
    assert f'<option value="{repository.pk}">sample</option>' in form
    assert "Configured providers: scripted" in form
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("session-new"),
            {"repository": repository.pk, "prompt": "Make the failing test pass", "model": "scripted/demo"},
        )
    session = Session.objects.get()
    assert response.status_code == 302 and response["Location"] == page_of(session)
    assert session.source == Source.WEB
    assert session.created_by == owner
    assert session.base_branch == repository.default_branch
    assert session.runs.get().status == Run.Status.QUEUED
    assert session.messages.get().content == "Make the failing test pass"


def test_it_starts_a_session_on_a_new_clone_url(owner, team, loopback_remotes):
    response = browser(owner).post(
        reverse("session-new"),
        {"repository_url": "https://127.0.0.1/acme/widgets.git", "prompt": "Hi", "base_branch": "dev"},
    )
    session = Session.objects.get()
    assert response.status_code == 302
    assert session.repository.name == "widgets" and session.base_branch == "dev"
    assert session.model == "scripted/demo"  # the configured default


def field_errors(html: str, field: str) -> str:
    """The text of the error block rendered next to ``field`` (the one its input points at)."""
    marker = f'id="id_{field}_error">'
    assert marker in html, f"no error shown at {field}"
    start = html.index(marker)
    return html[start : html.index("</div>", start)]


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"prompt": "   "}, "prompt", "The prompt is empty."),
        ({"model": "nope"}, "model", "is not of the form provider/model"),
        ({"model": "other/x"}, "model", "Unknown provider"),
        ({"base_branch": "bad..branch"}, "base_branch", "is not a valid branch name"),
        ({"repository": ""}, "repository", "This field is required"),
        ({"repository_url": "not a url"}, "repository_url", "Not a git URL"),
        ({"repository_url": "/etc"}, "repository_url", "not under a local repository root"),
        ({"repository_url": "https://127.0.0.1/x.git"}, "repository", "not both"),
    ],
)
def test_it_shows_validation_errors_at_the_field(owner, repository, data, field, words, loopback_remotes):
    body = {"repository": repository.pk, "prompt": "Do it", "model": "scripted/demo", **data}
    response = browser(owner).post(reverse("session-new"), body)
    assert response.status_code == 400
    html = response.content.decode()
    assert words in field_errors(html, field)
    assert 'aria-invalid="true"' in html
    assert Session.objects.count() == 0


def test_it_refuses_a_repository_of_another_team(owner, outsider, other_team):
    theirs = Repository.objects.create(team=other_team, name="theirs", url="/srv/theirs", provider="local")
    response = browser(owner).post(reverse("session-new"), {"repository": theirs.pk, "prompt": "x"})
    assert response.status_code == 400
    assert "Unknown repository" in field_errors(response.content.decode(), "repository")
    assert Session.objects.count() == 0


def test_it_keeps_what_was_typed_after_an_error(owner, repository):
    response = browser(owner).post(
        reverse("session-new"), {"repository": repository.pk, "prompt": "Keep me", "model": "bad"}
    )
    assert b"Keep me" in response.content


def test_it_offers_environments_and_their_models(owner, team, repository):
    env = Environment.objects.create(team=team, name="py312", default_model="scripted/big")
    page = browser(owner).get(reverse("session-new")).content.decode()
    assert f'<option value="{env.pk}">py312</option>' in page
    assert '<option value="scripted/big">' in page


# --- session page -----------------------------------------------------------------------------------------


def test_it_shows_the_timeline_totals_plan_diff_and_artifacts(session, owner):
    a_worked_session(session)
    page = browser(owner).get(page_of(session)).content.decode()
    for text in (
        "Prompt",
        "Fix the adder",
        "I will run the tests first.",
        '<span class="tool-name">bash</span>',
        "python3 -m unittest",
        "FAILED (failures=1)",
        "Fixed add(); re-running the tests",
        "Model error, retrying",
        "HTTP 500 from the model",
        "Fix add()",  # the plan
        "This sandbox is not isolated.",
        "bubblewrap is not installed",
        '<dd id="total-input">900</dd>',
        '<dd id="total-cost">$0.0030</dd>',
        "2 files changed",
        "calc.py",
        "CHANGELOG.md",
        '<span class="k">return</span> <span class="n">a</span> <span class="o">+</span>',  # highlighted
        f"/api/v1/artifacts/{session.artifacts.get().pk}/download",
    ):
        assert text in page, text
    assert '<span class="add">+3</span> <span class="del">−1</span>' in page
    assert "<script>alert(1)</script>" not in page  # diff text is escaped
    assert 'class="badge tool-error"' in page
    assert 'id="cancel-form"' in page and 'id="cancel-form" hidden' not in page  # a run is active


def test_it_pins_the_live_cursor_to_the_rendered_events(session, owner):
    page = browser(owner).get(page_of(session))
    config = page.context["config"]
    assert config["after"] == Session.objects.get(pk=session.pk).last_seq == 2
    assert config["eventsUrl"] == f"/api/v1/sessions/{session.pk}/events"
    assert 'id="session-config"' in page.content.decode()


def test_it_marks_follow_ups_pending_until_a_run_picks_them_up(session, owner):
    session.add_message("And add a changelog", author=owner)
    page = browser(owner).get(page_of(session)).content.decode()
    assert page.count('class="badge pending"') == 2
    Message.objects.filter(session=session).update(status=Message.Status.CLAIMED)
    emit(session.pk, "run_started", {"run_id": 1, "attempt": 1})
    assert 'class="badge pending"' not in browser(owner).get(page_of(session)).content.decode()


def test_it_shows_empty_states_on_a_fresh_session(team, owner, repository):
    session = Session.objects.create(team=team, repository=repository, base_branch="main", model="m/x")
    page = browser(owner).get(page_of(session)).content.decode()
    assert 'id="timeline-empty">' in page
    assert "No plan yet." in page and "No artifacts yet." in page
    assert "No changes yet." in page


def test_it_sends_a_follow_up(session, teammate):
    client = browser(teammate)
    response = client.post(reverse("session-message", args=[session.pk]), {"content": "Also update the docs"})
    assert response.status_code == 302 and response["Location"] == page_of(session)
    assert session.messages.order_by("position").last().content == "Also update the docs"
    json_response = client.post(
        reverse("session-message", args=[session.pk]),
        {"content": "And tests"},
        HTTP_ACCEPT="application/json",
    )
    assert json_response.status_code == 201
    assert json_response.json()["message"]["position"] == 3


def test_it_shows_follow_up_errors_at_the_field(session, owner):
    client = browser(owner)
    response = client.post(reverse("session-message", args=[session.pk]), {"content": "  "})
    assert response.status_code == 400
    assert 'id="followup-error" role="alert">' in response.content.decode()
    assert "The message is empty." in response.content.decode()
    as_json = client.post(
        reverse("session-message", args=[session.pk]), {"content": ""}, HTTP_ACCEPT="application/json"
    )
    assert as_json.status_code == 400 and as_json.json() == {"errors": {"content": ["The message is empty."]}}
    assert session.messages.count() == 1


def test_it_cancels_a_session(session, owner):
    response = browser(owner).post(reverse("session-cancel", args=[session.pk]), follow=True)
    assert Session.objects.get(pk=session.pk).status == SessionStatus.CANCELLED
    assert b"Session cancelled." in response.content
    again = browser(owner).post(reverse("session-cancel", args=[session.pk]), follow=True)
    assert b"already cancelled" in again.content


def test_it_archives_a_session_and_refuses_more_messages(session, owner):
    client = browser(owner)
    response = client.post(reverse("session-archive", args=[session.pk]), follow=True)
    session.refresh_from_db()
    assert session.status == SessionStatus.ARCHIVED
    assert not session.runs.filter(status__in=Run.ACTIVE).exists()  # the queued run was cancelled
    assert session.events.filter(type="status").order_by("-seq").first().payload == {"status": "archived"}
    assert b"Session archived." in response.content
    assert b'id="followup"' not in response.content
    refused = client.post(reverse("session-message", args=[session.pk]), {"content": "more"})
    assert refused.status_code == 400 and b"archived" in refused.content
    assert session.messages.count() == 1


def test_it_serves_the_diff_fragment(session, owner):
    a_worked_session(session)
    artifact = session.artifacts.get()
    client = browser(owner)
    fragment = client.get(
        reverse("session-diff", args=[session.pk]), {"artifact": artifact.pk}, HTTP_X_DEPUTIES_FRAGMENT="1"
    )
    assert fragment.status_code == 200
    assert b"calc.py" in fragment.content and b"<html" not in fragment.content
    assert client.get(reverse("session-diff", args=[session.pk]), {"artifact": 999999}).status_code == 404


# --- usage and setup -------------------------------------------------------------------------------------


def test_it_charts_usage_for_the_users_teams(session, owner, outsider, other_team):
    LLMCall.objects.create(
        session=session,
        provider="scripted",
        model="demo",
        input_tokens=1200,
        output_tokens=300,
        cost_usd=Decimal("0.25"),
    )
    Session.objects.filter(pk=session.pk).update(status=SessionStatus.COMPLETED)
    page = browser(owner).get(reverse("usage")).content.decode()
    assert page.count("<svg") == 3
    assert "scripted/demo" in page and "$0.2500" in page
    assert "median duration" in page
    filtered = browser(owner).get(reverse("usage"), {"team": "alpha", "days": "7"})
    assert filtered.status_code == 200 and b"last 7 days" in filtered.content
    theirs = browser(outsider).get(reverse("usage")).content.decode()
    assert "scripted/demo" not in theirs and "No model calls in this period." in theirs
    unknown = browser(outsider).get(reverse("usage"), {"team": "alpha"}).content.decode()
    assert "Unknown team" in unknown and "scripted/demo" not in unknown


def test_it_shows_each_teams_spend_against_its_monthly_budget(settings, session, team, owner):
    settings.TEAM_MONTHLY_BUDGET_USD = 0
    LLMCall.objects.create(session=session, provider="scripted", model="demo", cost_usd=Decimal("3"))
    page = browser(owner).get(reverse("usage")).content.decode()
    assert "Budgets this month" in page and "no limit" in page

    team.monthly_budget_usd = Decimal("4")
    team.save()
    page = browser(owner).get(reverse("usage")).content.decode()
    assert "$4.00" in page and 'value="75"' in page and "budget used up" not in page
    team.monthly_budget_usd = Decimal("2")
    team.save()
    page = browser(owner).get(reverse("usage")).content.decode()
    assert 'value="100"' in page and "runs stop: budget used up" in page


@pytest.mark.parametrize("who", ["owner", "teammate", "viewer"])
def test_it_renders_the_usage_page_for_every_role(request, who):
    assert browser(request.getfixturevalue(who)).get(reverse("usage")).status_code == 200


def test_it_shows_setup_status_to_staff_only(owner, django_user_model):
    assert browser(owner).get(reverse("setup")).status_code == 403
    admin = django_user_model.objects.create_user("admin", "a@example.com", "pw", is_staff=True)
    page = browser(admin).get(reverse("setup")).content.decode()
    for name in ("Database", "Queue workers", "Sandbox provider", "LLM providers", "Inbound webhooks"):
        assert name in page, name
    assert "No enabled webhook source yet." in page
    assert "sk-secret-key" not in page and "user:pw" not in page
    assert "http://127.0.0.1:9/v1" in page and "API key set" in page


def test_it_shows_a_fix_when_no_llm_provider_is_configured(settings, django_user_model):
    settings.LLM_PROVIDERS = {}
    admin = django_user_model.objects.create_user("admin", "a@example.com", "pw", is_staff=True)
    page = browser(admin).get(reverse("setup")).content.decode()
    assert "No LLM provider is configured." in page
    assert "DEPUTIES_LLM_OPENAI_API_KEY" in page


def test_it_keeps_the_api_and_admin_working(owner, session, django_user_model):
    assert browser(owner).get(f"/api/v1/sessions/{session.pk}").status_code == 200
    assert browser().get("/api/v1/nothing").status_code in (401, 403, 404)
    admin = django_user_model.objects.create_superuser("root", "r@example.com", "pw")
    assert browser(admin).get("/admin/").status_code == 200


def test_it_lists_sessions_in_a_fixed_number_of_queries(team, owner, repository):
    client = browser(owner)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/").status_code == 200
        return len(captured)

    start_session(team=team, repository=repository, prompt="one", model="m/x", created_by=owner)
    one = queries()
    for n in range(5):
        start_session(team=team, repository=repository, prompt=f"more {n}", model="m/x", created_by=owner)
    assert queries() == one


def test_it_reads_renames_deletions_and_binary_files_in_a_diff():
    diff = parse_diff(
        "diff --git a/old name.py b/new name.py\n"
        "similarity index 90%\n"
        "rename from old name.py\n"
        "rename to new name.py\n"
        "diff --git a/gone.txt b/gone.txt\n"
        "deleted file mode 100644\n"
        "--- a/gone.txt\n"
        "+++ /dev/null\n"
        "@@ -1,2 +0,0 @@\n"
        "-a\n"
        "-b\n"
        "diff --git a/logo.png b/logo.png\n"
        "GIT binary patch\n"
    )
    renamed, gone, logo = diff.files
    assert (renamed.path, renamed.old_path, renamed.change) == ("new name.py", "old name.py", "renamed")
    assert (gone.change, gone.deletions, gone.additions) == ("deleted", 2, 0)
    assert [line.old for line in gone.lines if line.kind == "del"] == [1, 2]
    assert logo.change == "binary"
    assert (diff.additions, diff.deletions) == (0, 2)


def test_it_highlights_code_in_a_diff_by_file_type_and_escapes_it():
    diff = parse_diff(
        "diff --git a/calc.py b/calc.py\n"
        "@@ -1 +1 @@\n"
        "-def add(a, b): return a - b  # <script>\n"
        "+def add(a, b): return a + b\n"
        "diff --git a/notes.unknown-type b/notes.unknown-type\n"
        "@@ -1 +1 @@\n"
        "+<b>plain</b>\n"
    )
    calc, notes = diff.files
    removed, added = (line for line in calc.lines if line.kind in ("add", "del"))
    assert '<span class="k">def</span>' in added.html and '<span class="nf">add</span>' in added.html
    assert "&lt;script&gt;" in removed.html and "<script>" not in removed.html
    assert all(line.html is None for line in notes.lines)  # unknown types stay plain (and escaped)


def test_it_serves_a_favicon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"].endswith("favicon.svg")


def test_it_shows_a_diff_opened_directly_as_a_whole_page_and_the_fragment_to_the_page(owner, session):
    a_worked_session(session)
    url = reverse("session-diff", args=[session.pk])
    whole = browser(owner).get(url).content.decode()
    assert "<html" in whole and "app.css" in whole and page_of(session) in whole
    fragment = browser(owner).get(url, HTTP_X_DEPUTIES_FRAGMENT="1").content.decode()
    assert "<html" not in fragment and "2 files changed" in fragment


def test_it_greets_a_logged_out_visitor_of_the_front_page_without_a_that_page_note(db):
    assert "Log in to see that page" not in browser().get("/login?next=/").content.decode()
    assert "Log in to see that page" in browser().get("/login?next=/usage").content.decode()


def test_it_suggests_a_local_path_when_the_team_only_has_local_repositories(owner, repository):
    assert 'placeholder="/path/to/a/git/repository"' in browser(owner).get("/sessions/new").content.decode()
    Repository.objects.create(
        team=repository.team, name="gh", url="https://github.com/a/b.git", provider="github"
    )
    assert "https://github.com/acme/widgets.git" in browser(owner).get("/sessions/new").content.decode()


def test_it_offers_the_sample_repository_on_an_empty_list_and_prefills_the_form(
    owner, viewer, team, sample_repo
):
    sample = Repository.objects.create(team=team, name="sample-repo", url=str(sample_repo), provider="local")
    listing = browser(owner).get("/").content.decode()
    assert (
        'id="sample-offer"' in listing
        and f"?repository={sample.pk}&amp;prompt=Make%20the%20failing" in listing
    )
    assert 'id="sample-offer"' not in browser(viewer).get("/").content.decode()  # viewers cannot start one
    form = browser(owner).get(f"/sessions/new?repository={sample.pk}&prompt=Make+the+failing+test+pass")
    html = form.content.decode()
    assert (
        f'<option value="{sample.pk}" selected>' in html and "Make the failing test pass</textarea>" in html
    )

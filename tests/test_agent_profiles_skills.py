"""Agent profiles and skills: real runs (in-process runner, local sandbox), the scripted model over
HTTP recording what it was sent, and the API."""

from __future__ import annotations

import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from sessions.agent.fake_llm import start_in_thread
from sessions.agent.skills import repository_skills
from sessions.models import AgentProfile, Environment, Event, Repository, Skill, start_session
from sessions.runner import execute
from tests.conftest import client_for, make_git_repo

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "PATH": "/usr/bin:/bin",
}


def call(tool: str, **arguments) -> dict:
    return {"name": tool, "arguments": arguments}


def run_script(run_settings, session, script: dict) -> list[dict]:
    """Run the session's first run against the scripted model; the request bodies it received."""
    with start_in_thread(script) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
        return [r["body"] for r in fake.requests]


def tool_names(body: dict) -> list[str]:
    return [t["function"]["name"] for t in body.get("tools", [])]


def finished(session) -> list[dict]:
    return [e.payload for e in Event.objects.filter(session=session, type="tool_finished").order_by("seq")]


def repo_with_skills(tmp_path: Path, files: dict[str, str]) -> Path:
    path = make_git_repo(tmp_path / "repo")
    folder = path / ".deputies" / "skills"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "skills"]):
        subprocess.run(argv, cwd=path, env=GIT_ENV, check=True, capture_output=True)
    return path


# --- profiles ------------------------------------------------------------------------------------


def test_it_sends_no_bash_tool_under_a_profile_without_bash(run_settings, team, owner, repository):
    profile = AgentProfile.objects.create(
        team=team,
        name="reader",
        allowed_tools=["read_file", "list_files", "finish"],
        system_prompt="Only read; never change files.",
        max_steps=3,
    )
    session = start_session(
        team=team,
        repository=repository,
        prompt="Look",
        model="scripted/demo",
        created_by=owner,
        profile=profile,
    )
    bodies = run_script(
        run_settings,
        session,
        {
            "responses": [
                {"tool_calls": [call("bash", command="touch /tmp/owned")]},
                {"tool_calls": [call("read_file", path="calc.py")]},
                {"tool_calls": [call("finish", summary="Read it.")]},
            ]
        },
    )
    assert len(bodies) == 3
    assert all(tool_names(b) == ["read_file", "list_files", "finish"] for b in bodies)
    system = bodies[0]["messages"][0]["content"]
    assert "Only read; never change files." in system and "`bash`" not in system
    assert "Tools: `read_file`, `list_files`, `finish`\n" in system
    outputs = finished(session)
    assert outputs[0]["name"] == "bash" and outputs[0]["ok"] is False
    assert "unknown tool 'bash'" in outputs[0]["output"]
    assert outputs[1]["ok"] is True and "def add" in outputs[1]["output"]
    session.refresh_from_db()
    assert (session.status, session.profile_id) == ("completed", profile.pk)


def test_it_stops_at_the_profiles_step_limit(run_settings, team, owner, repository):
    profile = AgentProfile.objects.create(team=team, name="short", max_steps=2)
    session = start_session(
        team=team,
        repository=repository,
        prompt="Go",
        model="scripted/demo",
        created_by=owner,
        profile=profile,
    )
    bodies = run_script(
        run_settings,
        session,
        {"responses": [{"tool_calls": [call("report_progress", message=f"{i}")]} for i in range(4)]},
    )
    assert len(bodies) == 2
    session.refresh_from_db()
    assert (session.status, session.error) == ("failed", "step limit (2) reached")


def test_it_offers_every_tool_without_a_profile(run_settings, team, owner, repository):
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    bodies = run_script(run_settings, session, {"responses": [{"content": "Done."}]})
    names = tool_names(bodies[0])
    assert {"bash", "read_file", "edit_file", "finish", "web_fetch"} <= set(names)
    assert "load_skill" not in names and "web_search" not in names  # no skills, no search backend


def test_it_takes_the_environment_default_profile_then_the_teams(team, owner, repository):
    team_profile = AgentProfile.objects.create(team=team, name="team", budget_usd=Decimal("3.00"))
    env_profile = AgentProfile.objects.create(team=team, name="env")
    team.default_profile = team_profile
    team.save()
    environment = Environment.objects.create(team=team, name="e", default_profile=env_profile)

    def start(**kwargs):
        return start_session(team=team, repository=repository, prompt="p", model="scripted/demo", **kwargs)

    assert start(environment=environment).profile == env_profile
    plain = start()
    assert (plain.profile, plain.budget_usd) == (team_profile, Decimal("3.00"))
    chosen = AgentProfile.objects.create(team=team, name="chosen")
    assert start(environment=environment, profile=chosen).profile == chosen
    assert start(budget_usd=Decimal("1.00")).budget_usd == Decimal("1.00")


# --- skills --------------------------------------------------------------------------------------


def test_it_lists_skill_descriptions_and_loads_a_body_on_demand(
    run_settings, team, owner, teammate, tmp_path
):
    repo = repo_with_skills(
        tmp_path,
        {
            "release.md": "---\ndescription: How we cut a release\n---\nBump VERSION, then tag vX.Y.Z.\n",
            "style.md": "# Our Python style\n\nUse dataclasses, never namedtuples.\n",
            "NOT A NAME.md": "ignored",
        },
    )
    repository = Repository.objects.create(team=team, name="r", url=str(repo), provider="local")
    Skill.objects.create(
        team=team, name="triage", description="Label and route a bug report", body="Ask for a repro first."
    )
    # Personal skills: the creator's wins over the team's of the same name; a teammate's is unseen.
    Skill.objects.create(
        team=team, owner=owner, name="style", description="My own style notes", body="Tabs are banned."
    )
    Skill.objects.create(team=team, owner=teammate, name="secret-sauce", description="Not yours", body="x")
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    bodies = run_script(
        run_settings,
        session,
        {
            "responses": [
                {"tool_calls": [call("load_skill", name="release"), call("load_skill", name="style")]},
                {"tool_calls": [call("load_skill", name="secret-sauce")]},
                {"tool_calls": [call("finish", summary="Released.")]},
            ]
        },
    )
    system = bodies[0]["messages"][0]["content"]
    assert "`release`: How we cut a release" in system
    assert "`triage`: Label and route a bug report" in system
    assert "`style`: My own style notes" in system
    assert "secret-sauce" not in system and "NOT A NAME" not in system
    assert (
        "Bump VERSION" not in system and "Ask for a repro" not in system
    )  # bodies cost nothing until loaded
    assert "load_skill" in tool_names(bodies[0])
    results = [m["content"] for m in bodies[1]["messages"] if m["role"] == "tool"]
    assert "Bump VERSION, then tag vX.Y.Z." in results[0] and "(repository)" in results[0]
    assert "Tabs are banned." in results[1] and "(personal, revision 1)" in results[1]
    refused = [m["content"] for m in bodies[2]["messages"] if m["role"] == "tool"][-1]
    assert "no skill named 'secret-sauce'" in refused


def test_it_lists_the_skills_of_a_repository_with_a_setup_script(run_settings, team, owner, tmp_path):
    repo = repo_with_skills(tmp_path, {"ship.md": "---\ndescription: Ship it\n---\nRun make ship.\n"})
    (repo / ".deputies" / "setup").write_text("echo set up > setup.log\n")
    for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "setup"]):
        subprocess.run(argv, cwd=repo, env=GIT_ENV, check=True, capture_output=True)
    repository = Repository.objects.create(team=team, name="r", url=str(repo), provider="local")
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    script = {"responses": [{"tool_calls": [call("finish", summary="Done.")]}]}
    bodies = run_script(run_settings, session, script)
    assert session.events.filter(type="setup_finished").exists()
    assert "`ship`: Ship it" in bodies[0]["messages"][0]["content"]


def test_it_never_follows_a_symlinked_repository_skill(tmp_path):
    """The worker reads its trusted checkout: a link there could point at any file of the worker."""
    outside = tmp_path / "outside.md"
    outside.write_text("worker-only secret text")
    checkout = repo_with_skills(tmp_path, {"ok.md": "Fine skill\n\nbody"})
    (checkout / ".deputies" / "skills" / "leak.md").symlink_to(outside)
    docs = repository_skills(checkout, None)
    assert [(d.name, d.description) for d in docs] == [("ok", "Fine skill")]
    # A linked folder is not read at all.
    other = tmp_path / "other"
    other.mkdir()
    (other / ".deputies").mkdir()
    (other / ".deputies" / "skills").symlink_to(checkout / ".deputies" / "skills")
    assert repository_skills(other, None) == []


def test_it_bumps_a_skills_revision_on_every_edit(team):
    skill = Skill.objects.create(team=team, name="a", description="d", body="one")
    skill.body = "two"
    skill.save()
    assert skill.revision == 2


# --- API -----------------------------------------------------------------------------------------

PROFILES = "/api/v1/agent-profiles"
SKILLS = "/api/v1/skills"
SESSIONS = "/api/v1/sessions"


@pytest.fixture
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }


def test_it_creates_a_session_under_a_profile_over_the_api(providers, owner, team, repository):
    client = client_for(owner)
    created = client.post(
        PROFILES,
        {
            "name": "cheap",
            "model": "scripted/small",
            "summary_model": "scripted/tiny",
            "allowed_tools": ["read_file", "finish", "docs__*"],
            "max_steps": 5,
            "budget_usd": "2.50",
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    profile = created.json()
    response = client.post(
        SESSIONS, {"repository": repository.pk, "prompt": "Go", "profile": "cheap"}, format="json"
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["profile"], body["model"], body["budget_usd"]) == (profile["id"], "scripted/small", "2.50")
    # An explicit model still wins over the profile's.
    explicit = client.post(
        SESSIONS,
        {"repository": repository.pk, "prompt": "Go", "profile": str(profile["id"]), "model": "scripted/big"},
        format="json",
    ).json()
    assert explicit["model"] == "scripted/big"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "allowed_tools": ["bash", "rm_rf"]}, "allowed_tools"),
        ({"name": "x", "allowed_tools": "bash"}, "allowed_tools"),
        ({"name": "x", "model": "nowhere/model"}, "model"),
        ({"name": "x", "max_steps": 0}, "max_steps"),
        ({"name": "x", "skills": [1]}, "skills"),
    ],
)
def test_it_validates_profiles(providers, owner, body, field):
    response = client_for(owner).post(PROFILES, body, format="json")
    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_it_refuses_an_unknown_profile_for_a_session(providers, owner, outsider, other_team, repository):
    theirs = AgentProfile.objects.create(team=other_team, name="theirs")
    response = client_for(owner).post(
        SESSIONS, {"repository": repository.pk, "prompt": "Go", "profile": str(theirs.pk)}, format="json"
    )
    assert response.status_code == 400 and "profile" in response.json()["errors"]


def test_it_keeps_profiles_and_skills_to_their_team(providers, owner, viewer, outsider, team):
    AgentProfile.objects.create(team=team, name="p")
    Skill.objects.create(team=team, name="s", description="d", body="b")
    assert [p["name"] for p in client_for(viewer).get(PROFILES).json()["results"]] == ["p"]
    assert client_for(outsider).get(PROFILES).json()["results"] == []
    assert client_for(outsider).get(SKILLS).json()["results"] == []
    assert (
        client_for(viewer)
        .post(SKILLS, {"name": "v", "description": "d", "body": "b"}, format="json")
        .status_code
        == 403
    )


def test_it_manages_team_and_personal_skills_over_the_api(owner, teammate, team):
    client = client_for(owner)
    team_skill = client.post(
        SKILLS, {"name": "deploy", "description": "How to deploy", "body": "Run make"}, format="json"
    )
    assert team_skill.status_code == 201, team_skill.json()
    assert (team_skill.json()["personal"], team_skill.json()["revision"]) == (False, 1)
    mine = client.post(
        SKILLS, {"name": "deploy", "description": "Mine", "body": "My way", "personal": True}, format="json"
    )
    assert mine.status_code == 201, mine.json()
    assert (mine.json()["personal"], mine.json()["owner"]) == (True, "owner")
    clash = client.post(SKILLS, {"name": "deploy", "description": "again", "body": "b"}, format="json")
    assert clash.status_code == 400 and "name" in clash.json()["errors"]
    bad = client.post(SKILLS, {"name": "Not Valid", "description": "d", "body": "b"}, format="json")
    assert bad.status_code == 400 and "name" in bad.json()["errors"]

    edited = client.patch(f"{SKILLS}/{team_skill.json()['id']}", {"body": "Run make deploy"}, format="json")
    assert edited.json()["revision"] == 2
    # The teammate sees the team skill, not the owner's personal one, and cannot touch it.
    seen = client_for(teammate).get(SKILLS).json()["results"]
    assert [(s["name"], s["personal"]) for s in seen] == [("deploy", False)]
    assert client_for(teammate).get(f"{SKILLS}/{mine.json()['id']}").status_code == 404
    assert client.delete(f"{SKILLS}/{mine.json()['id']}").status_code == 204
    assert Skill.objects.count() == 1


def test_it_names_the_session_with_the_profiles_summary_model(run_settings, team, owner, repository):
    """No DEPUTIES_SUMMARY_MODEL: the profile's cheaper model names the session after its first run."""
    profile = AgentProfile.objects.create(team=team, name="titled", summary_model="cheap/tiny")
    session = start_session(
        team=team, repository=repository, prompt="hi there, fix it", model="scripted/demo", profile=profile
    )
    work = {"responses": [{"tool_calls": [call("finish", summary="Fixed.")]}]}
    with (
        start_in_thread(work) as main,
        start_in_thread({"responses": [{"content": "Fix the adder"}]}) as cheap,
    ):
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": main.base_url, "api_key": "k"},
            "cheap": {"kind": "openai", "base_url": cheap.base_url, "api_key": "k"},
        }
        run_settings.SUMMARY_MODEL = ""
        assert execute(session.runs.get().pk) == "completed"
        assert [r["body"]["model"] for r in cheap.requests] == ["tiny"]
    session.refresh_from_db()
    assert session.title == "Fix the adder"
    (title,) = [e.payload for e in Event.objects.filter(session=session, type="title")]
    assert title["model"] == "cheap/tiny"


def test_it_sets_an_environments_default_profile_over_the_api(providers, owner, team, other_team, repository):
    client = client_for(owner)
    profile = AgentProfile.objects.create(team=team, name="p", model="scripted/from-profile")
    theirs = AgentProfile.objects.create(team=other_team, name="q")
    created = client.post("/api/v1/environments", {"name": "e", "default_profile": profile.pk}, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["default_profile"] == profile.pk
    refused = client.patch(
        f"/api/v1/environments/{created.json()['id']}", {"default_profile": theirs.pk}, format="json"
    )
    assert refused.status_code == 400 and "default_profile" in refused.json()["errors"]
    session = client.post(
        SESSIONS,
        {"repository": repository.pk, "prompt": "Go", "environment": created.json()["id"]},
        format="json",
    ).json()
    assert (session["profile"], session["model"]) == (profile.pk, "scripted/from-profile")


def test_it_refuses_another_teams_profile_as_a_default_in_the_admin(team, other_team, admin_client):
    theirs = AgentProfile.objects.create(team=other_team, name="theirs")
    environment = Environment.objects.create(team=team, name="e")
    response = admin_client.post(
        f"/admin/agent_sessions/team/{team.pk}/change/",
        {"name": team.name, "slug": team.slug, "default_profile": theirs.pk, **MEMBERSHIP_FORMSET},
    )
    assert response.status_code == 200 and "belongs to another team" in response.content.decode()
    team.refresh_from_db()
    assert team.default_profile is None
    environment.default_profile = theirs
    with pytest.raises(ValidationError):
        environment.full_clean()


MEMBERSHIP_FORMSET = {
    "memberships-TOTAL_FORMS": "0",
    "memberships-INITIAL_FORMS": "0",
    "memberships-MIN_NUM_FORMS": "0",
    "memberships-MAX_NUM_FORMS": "1000",
}


def test_it_reads_repository_skills_from_the_sandbox_when_this_host_has_no_work_tree(loop_sandbox, tmp_path):
    """A follow-up on another worker host: its clone has no files, the sandbox has the repository."""
    loop_sandbox.write_file(".deputies/skills/ship.md", b"---\ndescription: Ship it\n---\nRun make ship.\n")
    loop_sandbox.write_file(".deputies/skills/nested/deep.md", b"Not picked\n")
    bare = tmp_path / "checkout"
    (bare / ".git").mkdir(parents=True)
    docs = repository_skills(bare, loop_sandbox)
    assert [(d.name, d.description, d.body) for d in docs] == [("ship", "Ship it", "Run make ship.")]
    # With a work tree here, the checkout is the truth and the sandbox is not asked.
    (bare / "README.md").write_text("hi")
    assert repository_skills(bare, loop_sandbox) == []


@pytest.fixture
def loop_sandbox(run_settings, db):
    from sandboxes.base import SandboxSpec
    from sandboxes.providers.local import LocalProvider

    provider = LocalProvider()
    handle = provider.create(SandboxSpec(session_id=1))
    yield handle
    provider.destroy(handle.id)

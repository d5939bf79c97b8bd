"""The skills page of the dashboard: list, create, edit, delete; viewers read, outsiders see nothing."""

from __future__ import annotations

from django.test import Client

from sessions.models import Skill


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_creates_lists_edits_and_deletes_a_skill(owner, teammate, team):
    client = login(owner)
    created = client.post(
        "/skills",
        {"team": team.pk, "name": "release", "description": "How we cut a release", "body": "Tag it."},
    )
    assert created.status_code == 302
    skill = Skill.objects.get()
    assert (skill.owner, skill.revision) == (None, 1)
    page = client.get("/skills").content.decode()
    assert "How we cut a release" in page and f'data-skill-id="{skill.pk}"' in page

    edited = client.post(
        f"/skills/{skill.pk}",
        {"name": "release", "description": "How we cut a release", "body": "Tag it, then push."},
    )
    assert edited.status_code == 302
    skill.refresh_from_db()
    assert (skill.body, skill.revision) == ("Tag it, then push.", 2)
    assert login(teammate).get(f"/skills/{skill.pk}").status_code == 200
    assert client.post(f"/skills/{skill.pk}/delete").status_code == 302
    assert not Skill.objects.exists()


def test_it_shows_errors_at_the_field(owner, team):
    response = login(owner).post(
        "/skills", {"team": team.pk, "name": "Not OK", "description": "d", "body": "b"}
    )
    assert response.status_code == 400
    assert "field-name" in response.content.decode() and not Skill.objects.exists()


def test_it_keeps_a_personal_skill_to_its_owner(owner, teammate, team):
    login(owner).post(
        "/skills", {"team": team.pk, "name": "mine", "description": "Mine", "body": "b", "personal": "on"}
    )
    skill = Skill.objects.get()
    assert skill.owner == owner
    assert "Mine" not in login(teammate).get("/skills").content.decode()
    assert login(teammate).get(f"/skills/{skill.pk}").status_code == 404


def test_it_lets_a_viewer_read_but_not_write(viewer, outsider, team):
    skill = Skill.objects.create(team=team, name="s", description="Team way", body="The body")
    client = login(viewer)
    page = client.get(f"/skills/{skill.pk}").content.decode()
    assert "read-only" in page and "The body" in page
    assert (
        client.post(f"/skills/{skill.pk}", {"name": "s", "description": "x", "body": "y"}).status_code == 403
    )
    assert (
        client.post("/skills", {"team": team.pk, "name": "n", "description": "d", "body": "b"}).status_code
        == 403
    )
    assert client.post(f"/skills/{skill.pk}/delete").status_code == 403
    assert login(outsider).get(f"/skills/{skill.pk}").status_code == 404


def test_it_starts_a_session_under_a_chosen_profile_from_the_form(settings, owner, team, repository):
    from sessions.models import AgentProfile, Session

    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    profile = AgentProfile.objects.create(team=team, name="careful", model="scripted/careful")
    client = login(owner)
    assert f'<option value="{profile.pk}">careful</option>' in client.get("/sessions/new").content.decode()
    response = client.post(
        "/sessions/new", {"repository": repository.pk, "prompt": "Go", "profile": profile.pk, "model": ""}
    )
    assert response.status_code == 302
    session = Session.objects.get()
    assert (session.profile, session.model) == (profile, "scripted/careful")


def test_it_shows_the_sessions_profile_on_its_page(owner, team, repository):
    from sessions.models import AgentProfile, start_session

    profile = AgentProfile.objects.create(team=team, name="careful")
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", profile=profile
    )
    assert "profile careful" in login(owner).get(f"/sessions/{session.pk}").content.decode()


def test_it_sets_an_environments_default_profile_on_its_page(settings, owner, team):
    from sessions.models import AgentProfile, Environment

    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    profile = AgentProfile.objects.create(team=team, name="careful")
    environment = Environment.objects.create(team=team, name="py")
    client = login(owner)
    page = client.get(f"/environments/{environment.pk}").content.decode()
    assert f'<option value="{profile.pk}">careful</option>' in page
    from tests.test_environment_pages import edit_data

    data = edit_data(environment, default_profile=str(profile.pk))
    response = client.post(f"/environments/{environment.pk}", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    environment.refresh_from_db()
    assert environment.default_profile == profile
    page = client.get(f"/environments/{environment.pk}").content.decode()
    assert f'<option value="{profile.pk}" selected>careful</option>' in page

"""sessions/bindings.py: the one binding of external threads to sessions, for every integration."""

from __future__ import annotations

import pytest

from sessions.bindings import BindingError, start_or_follow_up
from sessions.models import Session, SessionBinding, Source

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def providers(settings, tmp_path):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }
    settings.MEDIA_ROOT = tmp_path / "media"


def say(team, repository, text: str, key: str = "slack:T1:C2:1700000000.000100", **extra):
    return start_or_follow_up(
        team=team,
        source=Source.SLACK,
        key=key,
        thread="#deploys, thread 1700000000.000100",
        prompt=text,
        repository=repository,
        model="scripted/demo",
        **extra,
    )


def test_it_starts_and_binds_a_session_on_a_threads_first_message(team, owner, repository):
    routed = say(team, repository, "Roll back the deploy", created_by=owner, external_ref={"channel": "C2"})
    assert routed.created and routed.message is None
    session = routed.session
    assert session.source == "slack" and session.created_by == owner
    assert session.external_ref == {
        "channel": "C2",
        "binding": "slack:T1:C2:1700000000.000100",
        "thread": "#deploys, thread 1700000000.000100",
    }
    assert session.thread_label == "#deploys, thread 1700000000.000100"
    assert SessionBinding.objects.get().session == session


def test_it_adds_later_messages_of_the_thread_as_follow_ups(team, owner, repository):
    first = say(team, repository, "Roll back the deploy").session
    routed = say(team, repository, "And page the on-call", author=owner)
    assert not routed.created
    assert routed.session.pk == first.pk
    assert routed.message.position == 2 and routed.message.author == owner
    assert Session.objects.count() == 1


def test_it_keeps_one_session_per_thread(team, repository):
    a = say(team, repository, "One", key="github:acme/widgets#1").session
    b = say(team, repository, "Two", key="github:acme/widgets#2").session
    assert a.pk != b.pk
    assert SessionBinding.objects.count() == 2


def test_it_rebinds_a_thread_whose_session_was_archived(team, repository):
    old = say(team, repository, "One").session
    old.archive()
    routed = say(team, repository, "Two")
    assert routed.created and routed.session.pk != old.pk
    assert SessionBinding.objects.get().session == routed.session


def test_it_refuses_a_key_bound_in_another_team(team, other_team, repository):
    say(team, repository, "Ours")
    with pytest.raises(BindingError):
        say(other_team, repository, "Theirs")
    assert Session.objects.count() == 1

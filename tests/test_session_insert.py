"""start_session's one-statement insert: values left at a constant default are prepared once per
process (sessions/models.py ``_field_preps``); every other value still goes through its field."""

from __future__ import annotations

import pytest
from django.db import connection

from sessions.models import Message, Run, Session, Source, start_session

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="the Postgres insert")


def stored_as_built(obj) -> None:
    stored = type(obj).objects.get(pk=obj.pk)
    for f in type(obj)._meta.concrete_fields:
        if f.attname != "last_seq":  # bumped in the database by the events
            assert getattr(stored, f.attname) == getattr(obj, f.attname), f.attname


@pytest.mark.django_db
def test_a_child_session_stores_its_non_default_values(team, owner, repository):
    parent = start_session(team=team, repository=repository, prompt="Parent", model="scripted/demo")
    spawner = parent.active_runs[0]
    child = start_session(
        team=team,
        repository=repository,
        prompt="Child",
        model="scripted/demo",
        created_by=owner,
        parent=parent,
        spawned_by=spawner,
        spawn_call_id="call-7",
        source=Source.SLACK,
        base_branch="feature",
    )
    stored = Session.objects.get(pk=child.pk)
    # depth, spawn_call_id and source have constant defaults (0, "", "api"): these values are not.
    assert (stored.depth, stored.spawn_call_id, stored.source, stored.base_branch) == (
        1,
        "call-7",
        "slack",
        "feature",
    )
    assert (stored.parent_id, stored.spawned_by_id, stored.created_by_id) == (parent.pk, spawner.pk, owner.pk)
    for obj in (parent, child):
        stored_as_built(obj)
    stored_as_built(Message.objects.get(session=child))
    stored_as_built(Run.objects.get(session=child))
    assert Session.objects.get(pk=parent.pk).depth == 0

"""Serializers built from per-class field prototypes (``CopiedFields``) get the fields DRF would
make, each instance its own, bound to it: nothing leaks from one request or team to another."""

from __future__ import annotations

import pytest
from rest_framework import serializers

from sessions.api.serializers import CopiedFields, MessageCreateSerializer, SessionCreateSerializer

COPIED = [SessionCreateSerializer, MessageCreateSerializer]


@pytest.mark.parametrize("cls", COPIED)
def test_the_fields_are_the_ones_drf_would_make(cls):
    ours = cls().fields
    drf = serializers.Serializer.get_fields(cls())  # DRF's own: a deep copy of the declared fields
    assert list(ours) == list(drf)
    for name, field in ours.items():
        assert repr(field) == repr(drf[name])
        assert field.field_name == name and field.label == name.replace("_", " ").capitalize()


@pytest.mark.parametrize("cls", COPIED)
def test_each_instance_has_its_own_fields_bound_to_it(cls):
    first, second = cls(context={"n": 1}), cls(context={"n": 2})
    for name in first.fields:
        a, b = first.fields[name], second.fields[name]
        assert a is not b
        assert a.parent is first and b.parent is second
        assert a.context == {"n": 1} and b.context == {"n": 2}


@pytest.mark.django_db
def test_two_teams_validating_at_once_get_their_own_answers(team, other_team, owner):
    request = type("Request", (), {"user": owner})()
    data = {"repository": 999_999, "prompt": "hi", "model": "scripted/x"}
    mine = SessionCreateSerializer(data=data, context={"team": team, "request": request})
    theirs = SessionCreateSerializer(data=data, context={"team": other_team, "request": request})
    mine.fields, theirs.fields  # noqa: B018 - both built before either validates
    assert not mine.is_valid() and not theirs.is_valid()
    assert mine.errors["repository"] == [f"Unknown repository 999999 in team {team.slug!r}."]
    assert theirs.errors["repository"] == [f"Unknown repository 999999 in team {other_team.slug!r}."]
    later = SessionCreateSerializer(data={"prompt": 5}, context={"team": team, "request": request})
    assert not later.is_valid()
    assert later.errors["prompt"] == ["Not a valid string."]  # the field's own message, not carried over
    assert "prompt" not in mine.errors


def test_a_nested_serializer_is_refused():
    class Nested(CopiedFields, serializers.Serializer):
        inner = MessageCreateSerializer()

    with pytest.raises(TypeError, match="nested"):
        Nested().fields  # noqa: B018

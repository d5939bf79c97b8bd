"""Who may see and change what: every object belongs to a team.

A user who is not in an object's team gets 404 (its queryset never contains it), a viewer gets 403 on
writes, staff see and change everything. Querysets do the hiding; ``TeamWritePermission`` the 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db.models import QuerySet
from rest_framework import permissions
from rest_framework.exceptions import PermissionDenied, ValidationError

from sessions.models import WRITE_ROLES, Team

MAX_ID = 2**63 - 1  # primary keys are bigints; larger numbers are "not found", not a database error


def as_id(value: Any) -> int | None:
    """An id from JSON or a query string (int or digits), or ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and 0 < value <= MAX_ID:
        return value
    return None


def readable_teams(user) -> QuerySet[Team]:
    if user.is_staff:
        return Team.objects.all()
    return Team.objects.filter(memberships__user=user)


def writable_teams(user) -> QuerySet[Team]:
    if user.is_staff:
        return Team.objects.all()
    return Team.objects.filter(memberships__user=user, memberships__role__in=WRITE_ROLES)


def can_write(user, team_id: int) -> bool:
    return user.is_staff or writable_teams(user).filter(pk=team_id).exists()


def read_only_denial(team: Team | None = None) -> PermissionDenied:
    where = f"team {team.slug!r}" if team else "this team"
    return PermissionDenied(f"You have read-only (viewer) access to {where}; writing needs owner or member.")


def find_team(user, value: Any) -> Team | None:
    """A team the user can read, given by id or slug; ``None`` when there is no such team (or it is not theirs)."""
    teams = readable_teams(user)
    if (pk := as_id(value)) is not None and (team := teams.filter(pk=pk).first()) is not None:
        return team
    if isinstance(value, str) and value and "\x00" not in value:  # Postgres text cannot hold NUL
        return teams.filter(slug=value).first()
    return None


def team_for_write(user, value: Any = None, *, hint: Team | None = None) -> Team:
    """The team a new object goes into.

    ``value`` is what the request named (id or slug); without it, ``hint`` (the team of an object the
    request refers to, like the repository of a new session); without that, the one team the user
    can write in. Unknown teams are a 400 on ``team`` whether they exist or not, so nothing leaks.
    """
    if value not in (None, ""):
        team = find_team(user, value)
        if team is None:
            raise ValidationError({"team": [f"Unknown team {value!r}."]})
    elif hint is not None:
        team = hint
    else:
        writable = list(writable_teams(user).order_by("slug")[:6])
        if len(writable) == 1:
            team = writable[0]
        elif not writable:
            if readable_teams(user).exists():
                raise read_only_denial()
            raise PermissionDenied("You are not a member of any team.")
        else:
            slugs = ", ".join(t.slug for t in writable[:5])
            raise ValidationError(
                {"team": [f"This field is required: you can write in more than one team ({slugs}, ...)."]}
            )
    if not can_write(user, team.pk):
        raise read_only_denial(team)
    return team


def request_body(data: Any) -> Mapping[str, Any]:
    """The parsed body as a mapping; a JSON list or scalar is a 400, not a 500."""
    if not isinstance(data, Mapping):
        raise ValidationError({"non_field_errors": ["Expected a JSON object as the request body."]})
    return data


class TeamWritePermission(permissions.BasePermission):
    """Reads need only membership (the queryset enforces it); writes need owner or member."""

    message = "You have read-only (viewer) access to this team; writing needs owner or member."

    def has_object_permission(self, request, view, obj) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        team_id = obj.team_id if hasattr(obj, "team_id") else obj.session.team_id
        return can_write(request.user, team_id)

"""Dashboard pages for automations, and a session's scheduled follow-ups (sessions/automations.py).

Validation is the API's (sessions/api/automations.py), so the page and the API refuse the same
things with the same words.
"""

from __future__ import annotations

from types import SimpleNamespace

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from sessions.agent.profiles import default_profile
from sessions.api.automations import AutomationSerializer, ScheduledMessageSerializer
from sessions.api.permissions import can_write, readable_teams, writable_teams
from sessions.automations import Automation
from sessions.models import AgentProfile, Environment, Repository, SessionStatus

FIELDS = ("name", "cron", "timezone", "prompt", "repository", "environment", "profile", "model")


def visible_automations(user) -> QuerySet[Automation]:
    automations = Automation.objects.select_related(
        "team__default_profile", "repository", "environment__default_profile", "profile", "last_session"
    )
    return automations if user.is_staff else automations.filter(team__in=readable_teams(user))


def _errors(detail) -> dict[str, list[str]]:
    return {name: [str(m) for m in (problems if isinstance(problems, list) else [problems])]
            for name, problems in detail.items()}  # fmt: skip


@require_http_methods(["GET", "POST"])
@login_required
def automation_list(request: HttpRequest) -> HttpResponse:
    teams = list(writable_teams(request.user).order_by("name"))
    values: dict[str, str] = {"timezone": "UTC"}
    errors: dict[str, list[str]] = {}
    status = 200
    if request.method == "POST":
        values = {name: request.POST.get(name, "").strip() for name in ("team", *FIELDS)}
        team = next((t for t in teams if str(t.pk) == values["team"]), None)
        if team is None:
            errors = {"team": ["Choose a team you can write in."]}
        else:
            data = {k: v for k, v in values.items() if k != "team" and (v or k in ("prompt", "cron"))}
            serializer = AutomationSerializer(data=data, context={"team": team, "request": request})
            if serializer.is_valid():
                automation = serializer.save()
                messages.success(request, f"Automation {automation.name!r} created; it first runs at "
                                 f"{automation.next_fire_at:%Y-%m-%d %H:%M} UTC.")  # fmt: skip
                return redirect("automation-list")
            errors = _errors(serializer.errors)
        status = 400
    automations = list(visible_automations(request.user).order_by("team__name", "name"))
    for automation in automations:
        automation.recent = list(automation.firings.select_related("session").order_by("-due_at")[:5])
        automation.writable = can_write(request.user, automation.team_id)
        # Without its own profile a firing gets the environment's default, then the team's.
        automation.default_profile = (
            None if automation.profile else default_profile(automation.team, automation.environment)
        )
    team_ids = [t.pk for t in teams]
    return render(
        request,
        "sessions/automations.html",
        {
            "automations": automations,
            "teams": teams,
            "repositories": Repository.objects.filter(team_id__in=team_ids).select_related("team"),
            "environments": Environment.objects.filter(team_id__in=team_ids).select_related("team"),
            "profiles": AgentProfile.objects.filter(team_id__in=team_ids).select_related("team"),
            "values": SimpleNamespace(**{name: values.get(name, "") for name in ("team", *FIELDS)}),
            "errors": errors,
        },
        status=status,
    )


@require_POST
@login_required
def automation_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    automation = get_object_or_404(visible_automations(request.user), pk=pk)
    if not can_write(request.user, automation.team_id):
        raise PermissionDenied("You have read-only (viewer) access to this team.")
    if request.POST.get("action") == "pause":
        done, what = automation.pause(), "paused"
    else:
        done, what = automation.resume(), "resumed"
    if done:
        messages.success(request, f"Automation {automation.name!r} {what}.")
    else:
        messages.warning(request, f"Automation {automation.name!r} was already {what}.")
    return redirect("automation-list")


@require_POST
@login_required
def session_schedule_followup(request: HttpRequest, pk: int) -> HttpResponse:
    """Send a follow-up later (minutes from now), or cancel one (``cancel`` = its id)."""
    from sessions.web.views import writable_session

    session = writable_session(request, pk)
    if cancel := request.POST.get("cancel"):
        scheduled = get_object_or_404(session.scheduled_messages, pk=cancel)
        if scheduled.cancel():
            messages.success(request, "Scheduled follow-up cancelled.")
        else:
            messages.warning(request, f"Too late: the follow-up is already {scheduled.status}.")
        return redirect("session-detail", pk=pk)
    if session.status == SessionStatus.ARCHIVED:
        messages.error(request, "The session is archived; it takes no more messages.")
        return redirect("session-detail", pk=pk)
    try:
        delay = round(float(request.POST.get("minutes", "")) * 60)
    except ValueError:
        delay = 0
    serializer = ScheduledMessageSerializer(
        data={"content": request.POST.get("content", ""), "delay_seconds": max(delay, 0) or None}
    )
    if serializer.is_valid():
        scheduled = serializer.save(session=session, created_by=request.user)
        messages.success(request, f"Follow-up scheduled for {scheduled.due_at:%Y-%m-%d %H:%M} UTC.")
    else:
        for name, problems in _errors(serializer.errors).items():
            for problem in problems:
                messages.error(
                    request, f"{'minutes' if name in ('delay_seconds', 'due_at') else name}: {problem}"
                )
    return redirect("session-detail", pk=pk)

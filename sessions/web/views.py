"""Dashboard pages. Short functions: scope by team, call one model method or helper, render.

Someone else's session is a 404 (the scoped queryset never holds it), a viewer's write a 403.
"""

from __future__ import annotations

import statistics
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request

from sessions.api.permissions import can_write, find_team, readable_teams, writable_teams
from sessions.api.serializers import MessageCreateSerializer, MessageUpdateSerializer
from sessions.api.views import SessionViewSet, session_queryset
from sessions.budgets import month_start
from sessions.models import (
    Artifact,
    LLMCall,
    Message,
    Repository,
    Session,
    SessionStatus,
    Source,
)
from sessions.web import charts, setup_checks
from sessions.web.diff import read_diff
from sessions.web.forms import NewSessionForm, start_from_form
from sessions.web.timeline import TERMINAL, build_timeline

PAGE_SIZE = 25
TIMELINE_LIMIT = 1000  # the first paint shows the latest events; older ones stay in the API
USAGE_PERIODS = (7, 30, 90)


def visible_sessions(user) -> QuerySet[Session]:
    queryset = session_queryset()
    return queryset if user.is_staff else queryset.filter(team__in=readable_teams(user))


def wants_json(request: HttpRequest) -> bool:
    return request.headers.get("Accept", "").startswith("application/json")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def duration_of(session: Session) -> float:
    return ((session.finished or timezone.now()) - session.created).total_seconds()


# --- sessions list ----------------------------------------------------------------------------------


def api_filtered(request: HttpRequest, queryset: QuerySet[Session]) -> QuerySet[Session]:
    """The API's own list filters (status, repository, source, search), so the page and the API agree."""
    view = SessionViewSet(request=Request(request), action="list", format_kwarg=None)
    return view.filter_queryset(queryset)


@require_safe
@login_required
def session_list(request: HttpRequest) -> HttpResponse:
    params = request.GET
    queryset = visible_sessions(request.user)
    errors: list[str] = []
    try:
        queryset = api_filtered(request, queryset)
    except ValidationError as exc:
        errors += [f"{name}: {m}" for name, messages_ in exc.detail.items() for m in messages_]
    if params.get("mine"):
        queryset = queryset.filter(created_by=request.user)
    if params.get("status") != SessionStatus.ARCHIVED:
        queryset = queryset.exclude(status=SessionStatus.ARCHIVED)
    if errors:
        queryset = queryset.none()
    page = Paginator(queryset, PAGE_SIZE).get_page(params.get("page"))
    for session in page:
        session.duration_text = human_duration(duration_of(session))
    repositories = Repository.objects.filter(team__in=readable_teams(request.user)).order_by("name")
    filtered = any(params.get(k) for k in ("status", "repository", "source", "mine", "search"))
    query = params.copy()
    query.pop("page", None)
    return render(
        request,
        "sessions/list.html",
        {
            "page": page,
            "error": " ".join(errors),
            "filtered": filtered,
            "query": query.urlencode(),
            "statuses": SessionStatus.values,
            "sources": Source.values,
            "repositories": repositories,
            "params": params,
            "can_start": can_write_anywhere(request.user),
            "sample_repository": sample_repository(request.user, repositories)
            if not page.object_list
            else None,
            "sample_prompt": SAMPLE_PROMPT,
            "list_config": {
                "showNew": page.number == 1 and not filtered,
                "pollUrl": reverse("api-session-list") + "?limit=50",
            },
        },
    )


def can_write_anywhere(user) -> bool:
    return writable_teams(user).exists()


# --- new session ------------------------------------------------------------------------------------


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def session_new(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        # ?repository=<id>&prompt=... pre-fills the form (the empty list's sample-repository offer).
        initial = {k: request.GET[k] for k in ("repository", "prompt") if request.GET.get(k)}
        form = NewSessionForm(user=request.user, initial=initial)
        return render(request, "sessions/new.html", {"form": form, "read_only": not form.teams})
    if not can_write_anywhere(request.user):
        raise PermissionDenied(
            "You have read-only (viewer) access; starting a session needs owner or member."
        )
    form = NewSessionForm(request.POST, user=request.user)
    session = start_from_form(request, form)
    if session is not None:
        return redirect("session-detail", pk=session.pk)
    return render(request, "sessions/new.html", {"form": form, "read_only": False}, status=400)


# --- session detail ----------------------------------------------------------------------------------


def get_session(request: HttpRequest, pk: int) -> Session:
    return get_object_or_404(visible_sessions(request.user), pk=pk)


@require_safe
@login_required
def session_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return render_detail(request, get_session(request, pk))


def render_detail(request: HttpRequest, session: Session, followup: dict | None = None, status: int = 200):
    # The session row first: its last_seq and token totals belong together (one transaction writes
    # both), so events up to last_seq plus the live ones after it count every usage exactly once.
    last = session.last_seq
    recent = list(session.events.filter(seq__lte=last).order_by("-seq")[:TIMELINE_LIMIT])
    recent.reverse()
    pending = set(session.messages.filter(status=Message.Status.PENDING).values_list("pk", flat=True))
    items = build_timeline(recent, pending)
    todo = session.events.filter(type="todo", seq__lte=last).order_by("-seq").first()
    artifacts = list(session.artifacts.filter(kind__in=shown_artifact_kinds()).order_by("created", "pk"))
    diff_artifact = session.artifacts.filter(kind=Artifact.Kind.DIFF).order_by("-created", "-pk").first()
    sandbox = session.latest_sandboxes[0] if session.latest_sandboxes else None
    writable = can_write(request.user, session.team_id)
    active = bool(session.active_runs)
    config = {
        "id": session.pk,
        "after": last,
        "status": session.status,
        "created": session.created.isoformat(),
        "finished": session.finished.isoformat() if session.finished else None,
        "active": active,
        "canWrite": writable,
        "eventsUrl": reverse("api-session-events", args=[session.pk]),
        "diffUrl": reverse("session-diff", args=[session.pk]),
        "downloadUrl": reverse("api-artifact-download", args=[0]).replace("/0/", "/{id}/"),
        "totals": {
            "input_tokens": session.input_tokens,
            "output_tokens": session.output_tokens,
            "cost_usd": str(session.cost_usd),
        },
    }
    return render(
        request,
        "sessions/detail.html",
        {
            "session": session,
            "items": items,
            "older_events": max(0, last - TIMELINE_LIMIT) if len(recent) == TIMELINE_LIMIT else 0,
            "todos": todo.payload.get("todos", []) if todo else [],
            "artifacts": artifacts,
            "diff_artifact": diff_artifact,
            "diff": read_diff(diff_artifact) if diff_artifact else None,
            "sandbox": sandbox,
            "can_write": writable,
            "active": active,
            "terminal": session.status in TERMINAL,
            # The `scripted` provider replays a script (deputies fake-llm, the demo): say so where a
            # person would expect it to follow what they write.
            "scripted_model": session.model.split("/", 1)[0] == "scripted",
            "elapsed": human_duration(duration_of(session)),
            "followup": followup or {},
            "config": config,
            "family": session_family(session),
            "scheduled": list(session.scheduled_messages.filter(status="pending").order_by("due_at", "pk")),
        },
        status=status,
    )


def session_family(session: Session) -> dict | None:
    """The session's place in its tree of child sessions: its ancestors (root first) and its
    children with theirs; None for a session that has neither."""
    from sessions.children import ancestors

    chain = list(reversed(ancestors(session))) if session.parent_id else []
    fields = ("pk", "parent_id", "title", "status", "cost_usd", "children_cost_usd")
    children = list(Session.objects.filter(parent=session).only(*fields).order_by("pk"))
    grandchildren: dict[int, list[Session]] = {}
    for grandchild in Session.objects.filter(parent__in=children).only(*fields).order_by("pk"):
        grandchildren.setdefault(grandchild.parent_id, []).append(grandchild)
    if not chain and not children:
        return None
    titles = dict(Session.objects.filter(pk__in=[a.pk for a in chain]).values_list("pk", "title"))
    return {
        "ancestors": [{"pk": a.pk, "title": titles.get(a.pk) or f"Session {a.pk}"} for a in chain],
        "children": [{"session": c, "children": grandchildren.get(c.pk, [])} for c in children],
    }


def shown_artifact_kinds() -> list[str]:
    return [Artifact.Kind.DIFF, Artifact.Kind.LOG, Artifact.Kind.FILE, Artifact.Kind.TOOL_OUTPUT]


def writable_session(request: HttpRequest, pk: int) -> Session:
    session = get_session(request, pk)
    if not can_write(request.user, session.team_id):
        raise PermissionDenied(
            f"You have read-only (viewer) access to team {session.team.name}; this needs owner or member."
        )
    return session


@require_POST
@login_required
def session_message(request: HttpRequest, pk: int) -> HttpResponse:
    session = writable_session(request, pk)
    steer = request.POST.get("steer") in ("1", "on", "true")
    serializer = MessageCreateSerializer(data={"content": request.POST.get("content", ""), "steer": steer})
    errors: list[str] = []
    if session.status == SessionStatus.ARCHIVED:
        errors = ["The session is archived; it takes no more messages."]
    elif not serializer.is_valid():
        errors = [str(m) for m in serializer.errors.get("content", ["Invalid message."])]
    if errors:
        if wants_json(request):
            return JsonResponse({"errors": {"content": errors}}, status=400)
        followup = {"content": request.POST.get("content", ""), "errors": errors}
        return render_detail(request, get_session(request, pk), followup=followup, status=400)
    message = session.add_message(serializer.validated_data["content"], author=request.user, steer=steer)
    if wants_json(request):
        return JsonResponse(
            {"message": {"id": message.pk, "position": message.position, "steer": steer}}, status=201
        )
    if steer:
        messages.success(request, "Message sent. The running agent gets it before its next step.")
    else:
        messages.success(request, "Message sent. It is queued until the next run picks it up.")
    return redirect("session-detail", pk=pk)


@require_POST
@login_required
def session_message_change(request: HttpRequest, pk: int, message_id: int) -> HttpResponse:
    """Edit (``content`` given) or cancel (``cancel``) a follow-up no run has picked yet."""
    session = writable_session(request, pk)
    message = get_object_or_404(session.messages, pk=message_id)
    if "cancel" in request.POST:
        if message.position == 1:
            messages.warning(request, "The first prompt cannot be withdrawn; cancel the session instead.")
        elif message.withdraw():
            messages.success(request, "Follow-up cancelled.")
        else:
            messages.warning(request, f"Too late: the follow-up is already {message.status}.")
        return redirect("session-detail", pk=pk)
    serializer = MessageUpdateSerializer(data={"content": request.POST.get("content", "")})
    if not serializer.is_valid():
        for problem in serializer.errors.get("content", ["Invalid message."]):
            messages.error(request, str(problem))
    elif message.edit(serializer.validated_data["content"]):
        messages.success(request, "Follow-up changed.")
    else:
        messages.warning(request, f"Too late: the follow-up is already {message.status}.")
    return redirect("session-detail", pk=pk)


@require_POST
@login_required
def session_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    session = writable_session(request, pk)
    if session.cancel():
        messages.success(request, "Session cancelled.")
    else:
        messages.warning(request, f"The session is already {session.status}.")
    return redirect("session-detail", pk=pk)


@require_POST
@login_required
def session_archive(request: HttpRequest, pk: int) -> HttpResponse:
    session = writable_session(request, pk)
    if session.archive():
        messages.success(
            request, "Session archived. It is hidden from the list unless you filter by archived."
        )
    else:
        messages.warning(request, "The session is already archived.")
    return redirect("session-detail", pk=pk)


SAMPLE_REPOSITORY, SAMPLE_PROMPT = "sample-repo", "Make the failing test pass"


def sample_repository(user, repositories) -> Repository | None:
    """The sample repository `deputies up` registers in Simple mode, if the user may start sessions on it."""
    sample = next((r for r in repositories if r.name == SAMPLE_REPOSITORY and r.provider == "local"), None)
    return sample if sample is not None and can_write(user, sample.team_id) else None


@require_safe
@login_required
def session_diff(request: HttpRequest, pk: int) -> HttpResponse:
    """The diff viewer as a fragment, for the page to swap in when a run produces a new diff."""
    session = get_session(request, pk)
    diffs = session.artifacts.filter(kind=Artifact.Kind.DIFF)
    artifact_id = request.GET.get("artifact", "")
    if artifact_id.isdigit():
        artifact = get_object_or_404(diffs, pk=int(artifact_id))
    else:
        artifact = diffs.order_by("-created", "-pk").first()
    # The session page fetches the bare fragment; a person opening the address gets a whole page.
    fragment = request.headers.get("X-Deputies-Fragment") == "1"
    return render(
        request,
        "sessions/_diff.html" if fragment else "sessions/diff_page.html",
        {"session": session, "diff_artifact": artifact, "diff": read_diff(artifact) if artifact else None},
    )


# --- usage -----------------------------------------------------------------------------------------


def money(value: float) -> str:
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def tokens(value: float) -> str:
    value = int(value)
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:,}"


def count(value: float) -> str:
    return f"{int(value):,}"


@require_safe
@login_required
def usage(request: HttpRequest) -> HttpResponse:
    teams = readable_teams(request.user).order_by("name")
    team = None
    error = ""
    if slug := request.GET.get("team", ""):
        team = find_team(request.user, slug)
        if team is None:
            error = f"Unknown team {slug!r}: showing all your teams."
    days = int(request.GET["days"]) if request.GET.get("days") in {str(d) for d in USAGE_PERIODS} else 30
    today = timezone.now().date()
    since = timezone.now() - timedelta(days=days)
    scope = [team] if team else teams
    calls = LLMCall.objects.filter(session__team__in=scope, created__gte=since)
    sessions = Session.objects.filter(team__in=scope, created__gte=since)

    per_day = {
        row["day"]: float(row["cost"] or 0)
        for row in calls.annotate(day=TruncDate("created")).values("day").annotate(cost=Sum("cost_usd"))
    }
    day_points = []
    for n in range(days - 1, -1, -1):
        day = today - timedelta(days=n)
        day_points.append((day.strftime("%b %d"), per_day.get(day, 0.0)))
    cost_chart = charts.column_chart(day_points, money, label_every=max(1, days // 6))

    per_model = list(
        calls.filter(outcome=LLMCall.Outcome.OK)
        .values("provider", "model")
        .annotate(input=Sum("input_tokens"), output=Sum("output_tokens"), cost=Sum("cost_usd"), n=Count("id"))
        .order_by("-input")[:15]
    )
    model_chart = charts.bar_chart(
        [(f"{r['provider']}/{r['model']}", (r["input"] or 0, r["output"] or 0)) for r in per_model],
        tokens,
        colors=("c1", "c2"),
        names=("input", "output"),
    )
    status_counts = {r["status"]: r["n"] for r in sessions.values("status").annotate(n=Count("id"))}
    status_chart = charts.bar_chart(
        [(status_, (status_counts.get(status_, 0),)) for status_ in SessionStatus.values], count
    )
    durations = [
        (finished - created).total_seconds()
        for created, finished in sessions.filter(finished__isnull=False).values_list("created", "finished")[
            :20000
        ]
    ]
    totals = calls.aggregate(
        cost=Sum("cost_usd"),
        input=Sum("input_tokens"),
        output=Sum("output_tokens"),
        n=Count("id"),
        errors=Count("id", filter=~Q(outcome=LLMCall.Outcome.OK)),
    )
    return render(
        request,
        "sessions/usage.html",
        {
            "teams": teams,
            "team": team,
            "error": error,
            "days": days,
            "periods": USAGE_PERIODS,
            "cost_chart": cost_chart,
            "model_chart": model_chart,
            "per_model": [{**r, "cost": money(float(r["cost"] or 0))} for r in per_model],
            "status_chart": status_chart,
            "median_duration": human_duration(statistics.median(durations)) if durations else "—",
            "finished_sessions": len(durations),
            "total_cost": money(float(totals["cost"] or Decimal(0))),
            "total_tokens": tokens((totals["input"] or 0) + (totals["output"] or 0)),
            "session_count": sum(status_counts.values()),
            "call_count": totals["n"],
            "error_count": totals["errors"],
            "budgets": budget_rows(scope),
        },
    )


def budget_rows(teams) -> list[dict]:
    """This calendar month's spend against each team's monthly budget (sessions/budgets.py)."""
    spent = {
        row["session__team"]: row["cost"] or Decimal(0)
        for row in LLMCall.objects.filter(session__team__in=teams, created__gte=month_start())
        .values("session__team")
        .annotate(cost=Sum("cost_usd"))
    }
    default = Decimal(str(settings.TEAM_MONTHLY_BUDGET_USD))
    rows = []
    for t in teams:
        limit = t.monthly_budget_usd if t.monthly_budget_usd is not None else default
        cost = spent.get(t.pk, Decimal(0))
        share = min(100, int(cost * 100 / limit)) if limit else None
        rows.append(
            {
                "team": t,
                "spent": money(float(cost)),
                "limit": money(float(limit)) if limit else "no limit",
                "percent": share,
                "over": bool(limit) and cost >= limit,
            }
        )
    return rows


# --- setup status ----------------------------------------------------------------------------------


@require_safe
@login_required
def setup_status(request: HttpRequest) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied("The setup page is for administrators (staff accounts).")
    checks = setup_checks.all_checks()
    return render(
        request,
        "setup.html",
        {"checks": checks, "problems": sum(1 for c in checks if c.status in ("error", "warn"))},
    )

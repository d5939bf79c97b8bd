"""Spending limits: a session's own budget and its team's monthly one.

Checked by the agent loop before every model call, so a run stops *before* it spends past a limit
it has reached (one call can still overshoot by its own cost: the price is known only afterwards).
A stopped run fails with the reason; nothing stops silently. 0 / empty means no limit.

The loop checks through a ``RunBudget``: a session has one run at a time, so its spend is what the
database said plus what this run has spent since (the run keeps its own running total), and the
team's monthly spend is asked of the database at most every ``REFRESH_SECONDS`` per run, plus this
run's spend since. Only other sessions' spend of the last few seconds can be missed, and only until
the next refresh.
"""

from __future__ import annotations

import time
from decimal import Decimal

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from sessions.models import LLMCall, Session


def month_start(now=None):
    now = now or timezone.now()
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def team_month_spend(team_id: int, now=None) -> Decimal:
    total = LLMCall.objects.filter(session__team_id=team_id, created__gte=month_start(now)).aggregate(
        total=Sum("cost_usd")
    )["total"]
    return total or Decimal("0")


REFRESH_SECONDS = 5.0  # how stale a run's view of its session's and team's limits and spend may be


def _load(session_id: int) -> Session:
    return (
        Session.objects.select_related("team")
        .only(
            "cost_usd",
            "children_cost_usd",
            "budget_usd",
            "parent_id",
            "team_id",
            "team__monthly_budget_usd",
            "team__name",
        )
        .get(pk=session_id)
    )


def _problem(session, session_spent: Decimal, team_spent) -> str | None:
    """``team_spent``: the team's monthly spend, or a callable returning it (asked only if needed)."""
    limit = (
        session.budget_usd if session.budget_usd is not None else Decimal(str(settings.SESSION_BUDGET_USD))
    )
    if limit and session_spent >= limit:
        return f"budget exceeded: this session has spent ${session_spent:.4f} of its ${limit:.2f} budget"
    if session.parent_id and (headroom := getattr(session, "ancestor_headroom", None)) is not None:
        left, ancestor = headroom  # a child session: its spend since then also counts for its ancestors
        if session_spent - getattr(session, "ancestor_base", session_spent) >= left:
            return (
                f"budget exceeded: ancestor session {ancestor.pk} has used up its budget with its child "
                "sessions"
            )
    team_limit = session.team.monthly_budget_usd
    if team_limit is None:
        team_limit = Decimal(str(settings.TEAM_MONTHLY_BUDGET_USD))
    if team_limit:
        spent = team_spent() if callable(team_spent) else team_spent
        if spent >= team_limit:
            return (
                f"budget exceeded: team {session.team.name!r} has spent ${spent:.4f} of its "
                f"${team_limit:.2f} monthly budget"
            )
    return None


def _with_ancestors(session: Session, spent: Decimal) -> Session:
    """A child session carries what its ancestors' budgets have left (sessions/children.py)."""
    if session.parent_id:
        from sessions.children import ancestor_headroom

        session.ancestor_headroom, session.ancestor_base = ancestor_headroom(session), spent
    return session


def budget_problem(session_id: int) -> str | None:
    """Why the session may not call the model again, or None (straight from the database)."""
    session = _load(session_id)
    spent = session.cost_usd + session.children_cost_usd
    return _problem(_with_ancestors(session, spent), spent, lambda: team_month_spend(session.team_id))


class RunBudget:
    """The budget check of one running run, without a query per step (see the module docstring).

    ``run.cost_usd`` must be the run's running total (``Run.add_usage`` keeps it). The first check
    uses the session the run was loaded with (the claim loads it with its team), so a run's first
    step costs no query unless the team has a monthly limit.
    """

    def __init__(self, run) -> None:
        self.run = run
        self.session = None
        self.session_at = 0.0  # monotonic time the session row was read
        self.session_base = self.session_run_base = Decimal("0")
        self.team_spent = None
        self.team_at = 0.0
        self.team_run_base = Decimal("0")
        self.team_month = None

    def problem(self) -> str | None:
        now = time.monotonic()
        spent_by_run = self.run.cost_usd
        if self.session is None or now - self.session_at >= REFRESH_SECONDS:
            cached = self.run._state.fields_cache.get("session") if self.session is None else None
            if cached is not None and "team" in cached._state.fields_cache:
                self.session = cached
            else:
                self.session = _load(self.run.session_id)
            self.session_at = now
            self.session_base = self.session.cost_usd + self.session.children_cost_usd
            self.session_run_base = spent_by_run
            _with_ancestors(self.session, self.session_base)
        session_spent = self.session_base + (spent_by_run - self.session_run_base)
        return _problem(self.session, session_spent, lambda: self.team_month_spend(now, spent_by_run))

    def team_month_spend(self, now: float, spent_by_run: Decimal) -> Decimal:
        month = month_start()
        if self.team_spent is None or now - self.team_at >= REFRESH_SECONDS or month != self.team_month:
            self.team_spent = team_month_spend(self.session.team_id)
            self.team_at, self.team_run_base, self.team_month = now, spent_by_run, month
        return self.team_spent + (spent_by_run - self.team_run_base)

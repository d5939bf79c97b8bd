"""Spending limits: a session's own budget and its team's monthly one.

Checked by the agent loop before every model call, so a run stops *before* it spends past a limit
it has reached (one call can still overshoot by its own cost: the price is known only afterwards).
A stopped run fails with the reason; nothing stops silently. 0 / empty means no limit.
"""

from __future__ import annotations

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


def budget_problem(session_id: int) -> str | None:
    """Why the session may not call the model again, or None."""
    session = (
        Session.objects.select_related("team")
        .only("cost_usd", "budget_usd", "team__monthly_budget_usd", "team__name")
        .get(pk=session_id)
    )
    limit = (
        session.budget_usd if session.budget_usd is not None else Decimal(str(settings.SESSION_BUDGET_USD))
    )
    if limit and session.cost_usd >= limit:
        return f"budget exceeded: this session has spent ${session.cost_usd:.4f} of its ${limit:.2f} budget"
    team_limit = session.team.monthly_budget_usd
    if team_limit is None:
        team_limit = Decimal(str(settings.TEAM_MONTHLY_BUDGET_USD))
    if team_limit:
        spent = team_month_spend(session.team_id)
        if spent >= team_limit:
            return (
                f"budget exceeded: team {session.team.name!r} has spent ${spent:.4f} of its "
                f"${team_limit:.2f} monthly budget"
            )
    return None

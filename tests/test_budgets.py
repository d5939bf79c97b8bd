"""Spending and time limits on real runs: a local sandbox, the scripted model over HTTP, priced usage."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from sessions.agent.fake_llm import start_in_thread
from sessions.budgets import month_start
from sessions.models import Environment, Event, LLMCall, Run, Session, start_session
from sessions.runner import execute

# 1,000,000 prompt tokens at $1/Mtok: every call costs exactly $1.
PRICED = {"prompt_tokens": 1_000_000, "completion_tokens": 0}
BASH = {"name": "bash", "arguments": {"command": "true"}}
LOOPING = {"responses": [{"tool_calls": [BASH], "usage": PRICED}] * 10}


@pytest.fixture
def run_settings(run_settings):
    run_settings.LLM_PRICES = {"scripted/demo": {"input": 1.0, "output": 0.0}}
    run_settings.SESSION_BUDGET_USD = 0
    run_settings.TEAM_MONTHLY_BUDGET_USD = 0
    return run_settings


def run(run_settings, team, owner, repository, *, budget=None) -> Run:
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    if budget is not None:
        Session.objects.filter(pk=session.pk).update(budget_usd=budget)
    with start_in_thread(LOOPING) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
    return session.runs.get()


def test_a_session_stops_when_its_budget_is_spent(run_settings, team, owner, repository):
    done = run(run_settings, team, owner, repository, budget=Decimal("2.50"))

    assert done.status == Run.Status.FAILED
    assert done.error == "budget exceeded: this session has spent $3.0000 of its $2.50 budget"
    assert LLMCall.objects.filter(run=done).count() == 3  # the third call crossed the line
    failed = Event.objects.get(run=done, type="run_failed").payload
    assert failed["error"] == done.error
    assert Session.objects.get(pk=done.session_id).status == "failed"


def test_the_deployment_default_applies_without_a_session_budget(run_settings, team, owner, repository):
    run_settings.SESSION_BUDGET_USD = 1.0
    done = run(run_settings, team, owner, repository)

    assert done.status == Run.Status.FAILED and "of its $1.00 budget" in done.error
    assert LLMCall.objects.filter(run=done).count() == 1


def test_a_team_over_its_monthly_budget_makes_no_more_model_calls(run_settings, team, owner, repository):
    team.monthly_budget_usd = Decimal("5")
    team.save()
    earlier = start_session(team=team, repository=repository, prompt="x", model="scripted/demo")
    LLMCall.objects.create(session=earlier, provider="scripted", model="demo", cost_usd=Decimal("5"))
    last_month = month_start() - timedelta(days=1)
    LLMCall.objects.create(
        session=earlier, provider="scripted", model="demo", cost_usd=Decimal("100"), created=last_month
    )

    done = run(run_settings, team, owner, repository)

    assert done.status == Run.Status.FAILED
    assert done.error == f"budget exceeded: team {team.name!r} has spent $5.0000 of its $5.00 monthly budget"
    assert not LLMCall.objects.filter(run=done).exists()


def test_last_months_spend_does_not_count(run_settings, team, owner, repository):
    run_settings.TEAM_MONTHLY_BUDGET_USD = 3.0
    earlier = start_session(team=team, repository=repository, prompt="x", model="scripted/demo")
    LLMCall.objects.create(
        session=earlier,
        provider="scripted",
        model="demo",
        cost_usd=Decimal("100"),
        created=month_start(timezone.now()) - timedelta(seconds=1),
    )

    done = run(run_settings, team, owner, repository)

    assert done.status == Run.Status.FAILED and "monthly budget" in done.error
    assert LLMCall.objects.filter(run=done).count() == 3  # this month's own spend reached $3


def test_a_run_stops_at_its_environments_time_limit(run_settings, team, owner, repository):
    environment = Environment.objects.create(team=team, name="quick", timeout_seconds=1)
    session = start_session(
        team=team,
        repository=repository,
        environment=environment,
        prompt="Go",
        model="scripted/demo",
        created_by=owner,
    )
    slow = {"responses": [{"tool_calls": [BASH], "delay": 1.2}] * 5}  # the scripted model's latency
    with start_in_thread(slow) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
    done = session.runs.get()

    assert done.status == Run.Status.FAILED
    assert done.error.startswith("time limit: the run has taken ")
    assert done.error.endswith("over its environment's 1 s limit")
    assert LLMCall.objects.filter(run=done).count() == 1


def test_the_api_takes_a_session_budget_and_shows_it(settings, team, owner, repository):
    from tests.conftest import client_for

    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}
    }
    body = {"repository": repository.pk, "prompt": "Go", "model": "scripted/demo"}
    created = client_for(owner).post("/api/v1/sessions", {**body, "budget_usd": "2.50"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["budget_usd"] == "2.50"
    assert Session.objects.get(pk=created.json()["id"]).budget_usd == Decimal("2.50")

    bad = client_for(owner).post("/api/v1/sessions", {**body, "budget_usd": "-1"}, format="json")
    assert bad.status_code == 400 and "budget_usd" in bad.json()["errors"]
    assert Session.objects.count() == 1

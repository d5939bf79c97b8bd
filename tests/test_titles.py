"""Titles from the cheaper summary model (DEPUTIES_SUMMARY_MODEL): real runs, two scripted servers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sessions.agent.fake_llm import start_in_thread
from sessions.models import Event, LLMCall, Repository, Session, start_session
from sessions.runner import execute

pytestmark = pytest.mark.django_db(transaction=True)

WORK = {
    "responses": [{"tool_calls": [{"name": "finish", "arguments": {"summary": "Fixed add() in calc.py."}}]}]
}


@pytest.fixture
def repository(team, sample_repo):
    return Repository.objects.create(team=team, name="r", url=str(sample_repo), provider="local")


def run(
    run_settings,
    team,
    repository,
    title_script: dict,
    *,
    title: str = "",
    prompt: str = "hi, can you fix the failing test please",
) -> tuple[Session, list]:
    session = start_session(team=team, repository=repository, prompt=prompt, model="main/big", title=title)
    with start_in_thread(WORK) as main, start_in_thread(title_script) as cheap:
        run_settings.LLM_PROVIDERS = {
            "main": {"kind": "openai", "base_url": main.base_url, "api_key": "k"},
            "cheap": {"kind": "openai", "base_url": cheap.base_url, "api_key": "k"},
        }
        run_settings.SUMMARY_MODEL = "cheap/small"
        run_settings.LLM_PRICES = {"small": {"input": 0.1, "output": 0.4}, "big": {"input": 3, "output": 15}}
        run_settings.LLM_RETRY_BASE_DELAY = 0
        assert execute(session.runs.get().pk) == "completed"
        requests = list(cheap.requests)
    return Session.objects.get(pk=session.pk), requests


def test_it_names_a_session_with_the_cheap_model_after_its_first_run(run_settings, team, repository):
    session, requests = run(
        run_settings, team, repository, {"responses": [{"content": '"Fix the add() test."\n'}]}
    )
    assert session.title == "Fix the add() test" and session.status == "completed"
    (request,) = requests
    body = request["body"]
    assert body["model"] == "small" and body["max_tokens"] == 40 and "tools" not in body
    assert "hi, can you fix the failing test please" in body["messages"][1]["content"]
    assert "Fixed add() in calc.py." in body["messages"][1]["content"]
    cheap = LLMCall.objects.get(session=session, model="small")
    assert cheap.cost_usd > 0 and cheap.run_id == session.runs.get().pk
    big = LLMCall.objects.get(session=session, model="big")
    assert session.cost_usd == cheap.cost_usd + big.cost_usd  # counted in the session's spend
    assert Event.objects.filter(session=session, type="title").get().payload == {
        "title": "Fix the add() test",
        "model": "cheap/small",
    }


def test_it_keeps_a_title_the_user_gave(run_settings, team, repository):
    session, requests = run(
        run_settings, team, repository, {"responses": [{"content": "Other"}]}, title="Mine"
    )
    assert session.title == "Mine" and requests == []


def test_it_keeps_the_prompt_title_when_the_cheap_model_fails(run_settings, team, repository):
    session, requests = run(run_settings, team, repository, {"responses": [{"faults": [{"status": 400}]}]})
    assert session.title == "hi, can you fix the failing test please" and session.status == "completed"
    assert LLMCall.objects.filter(session=session, model="small").get().outcome == "error"
    assert not Event.objects.filter(session=session, type="title").exists()
    assert session.cost_usd == LLMCall.objects.get(session=session, model="big").cost_usd + Decimal("0")


def test_it_asks_nothing_without_a_summary_model(run_settings, team, repository):
    session = start_session(team=team, repository=repository, prompt="fix it", model="main/big")
    with start_in_thread(WORK) as main:
        run_settings.LLM_PROVIDERS = {"main": {"kind": "openai", "base_url": main.base_url, "api_key": "k"}}
        run_settings.SUMMARY_MODEL = ""
        assert execute(session.runs.get().pk) == "completed"
        assert len(main.requests) == 1
    assert Session.objects.get(pk=session.pk).title == "fix it"

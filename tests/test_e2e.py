"""A session from the HTTP API to a finished run, on real processes: a worker, scripted LLM, sandbox."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest
from django.db.models import Sum

from sessions.agent.fake_llm import start_in_thread
from sessions.models import APIToken, Event, LLMCall, Repository, Run, Session
from sessions.runner import execute
from tests.live import child_env, wait_for, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCRIPT = json.loads(open("deputies/demo/script.json").read())
PRICES = {"scripted/demo": {"input": 3.0, "output": 15.0, "cached": 0.3}}


def usage_of(responses: list[dict]) -> tuple[int, int, int]:
    return (
        sum(r["usage"]["prompt_tokens"] for r in responses),
        sum(r["usage"]["completion_tokens"] for r in responses),
        sum(r["usage"].get("cached_tokens", 0) for r in responses),
    )


def all_events(client: httpx.Client, session_id: int) -> list[dict]:
    events, after = [], 0
    while True:
        page = client.get(f"/api/v1/sessions/{session_id}/events", params={"after": after, "limit": 7}).json()
        if not page["events"]:
            return events
        events += page["events"]
        after = page["next_after"]


def diff_artifacts(client: httpx.Client, session_id: int) -> list[dict]:
    body = client.get(f"/api/v1/sessions/{session_id}/artifacts").json()
    items = body["results"] if isinstance(body, dict) else body
    return [a for a in items if a["kind"] == "diff"]


@pytest.mark.parametrize("worker", ["deputies", "qcluster"])
def test_it_runs_a_session_from_the_api_to_a_diff(
    live_server, settings, tmp_path, team, owner, sample_repo, worker
):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"
    settings.LLM_PRICES = PRICES
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    _, secret = APIToken.issue(owner, "e2e")

    with start_in_thread(SCRIPT) as fake:
        settings.LLM_PROVIDERS = {"scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}}
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="sk-test-secret-value",
            DEPUTIES_LLM_PRICES=json.dumps(PRICES),
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
        )
        headers = {"Authorization": f"Bearer {secret}"}
        with (
            worker_process(env, worker),
            httpx.Client(base_url=live_server.url, headers=headers, timeout=10) as client,
        ):
            created = client.post(
                "/api/v1/sessions",
                json={
                    "repository": repository.pk,
                    "prompt": "Make the failing test pass",
                    "model": "scripted/demo",
                },
            )
            assert created.status_code == 201, created.text
            session_id = created.json()["id"]

            def finished():
                body = client.get(f"/api/v1/sessions/{session_id}").json()
                return body if body["status"] in ("completed", "failed", "cancelled") else None

            body = wait_for(finished, timeout=90, what="the first run to finish")
            assert body["status"] == "completed", (body, (data_dir / "worker.log").read_text()[-3000:])
            assert "add()" in body["summary"]

            events = all_events(client, session_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            types = [e["type"] for e in events]
            for expected in (
                "sandbox_ready",
                "repository_ready",
                "assistant_text",
                "tool_started",
                "tool_finished",
                "todo",
                "progress",
                "usage",
                "artifact_created",
                "run_completed",
            ):
                assert expected in types, expected
            assert (
                types.index("sandbox_ready") < types.index("repository_ready") < types.index("tool_started")
            )
            assert "sk-test-secret-value" not in json.dumps(events)

            diffs = diff_artifacts(client, session_id)
            assert len(diffs) == 1
            diff = client.get(f"/api/v1/artifacts/{diffs[0]['id']}/download").text
            assert "-    return a - b" in diff and "+    return a + b" in diff

            first = SCRIPT["responses"][:6]
            calls = LLMCall.objects.filter(session_id=session_id, outcome="ok")
            assert calls.count() == len(first)
            totals = calls.aggregate(i=Sum("input_tokens"), o=Sum("output_tokens"), c=Sum("cached_tokens"))
            assert (totals["i"], totals["o"], totals["c"]) == usage_of(first)
            session = Session.objects.get(pk=session_id)
            assert (session.input_tokens, session.output_tokens, session.cached_tokens) == usage_of(first)
            assert session.cost_usd == calls.aggregate(s=Sum("cost_usd"))["s"] > Decimal("0")

            # A duplicate delivery of the finished run's task changes nothing.
            first_run = Run.objects.get(session_id=session_id)
            before = Event.objects.filter(session_id=session_id).count()
            assert execute(first_run.pk) == "skipped: run is completed"
            assert Event.objects.filter(session_id=session_id).count() == before

            # A follow-up runs a second Run in the same session, continuing the conversation.
            reply = client.post(
                f"/api/v1/sessions/{session_id}/messages", json={"content": "Add a changelog entry"}
            )
            assert reply.status_code == 201, reply.text
            body = wait_for(
                lambda: (
                    (b := finished())
                    and b["status"] == "completed"
                    and Run.objects.filter(session_id=session_id, status="completed").count() == 2
                    and b
                ),
                timeout=60,
                what="the follow-up run",
            )
            assert body["summary"] == "Added a CHANGELOG entry for the fix."
            assert Run.objects.filter(session_id=session_id).count() == 2
            diffs = diff_artifacts(client, session_id)
            assert len(diffs) == 2
            second = client.get(f"/api/v1/artifacts/{diffs[-1]['id']}/download").text
            assert "CHANGELOG.md" in second and "+    return a + b" in second
            events = all_events(client, session_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert [e["type"] for e in events].count("run_completed") == 2
            assert LLMCall.objects.filter(session_id=session_id, outcome="ok").count() == 8

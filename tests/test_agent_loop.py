"""The agent loop end to end: a real Run, a real local sandbox, the scripted model over HTTP."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.db import connection

from sandboxes.base import SandboxSpec
from sandboxes.providers.local import LocalProvider
from sessions.agent.fake_llm import start_in_thread
from sessions.agent.loop import build_system_prompt, run_agent
from sessions.agent.tools import TOOL_SPECS
from sessions.children import SPECS as SESSION_TOOL_SPECS
from sessions.models import Artifact, Event, LLMCall, Run, Session, start_session
from tests.conftest import SAMPLE_REPO


@pytest.fixture
def loop_settings(settings, tmp_path):
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "none"
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.LLM_RETRY_BASE_DELAY = 0.001
    settings.LLM_MAX_RETRIES = 2
    settings.LLM_MAX_TOKENS = 777
    settings.LLM_PRICES = {"scripted/demo": {"input": 1.0, "output": 4.0, "cached": 0.25}}
    return settings


@pytest.fixture
def scripted(loop_settings):
    servers = []

    def start(script: dict):
        fake = start_in_thread(script)
        servers.append(fake)
        loop_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "test-key"}
        }
        return fake

    yield start
    for fake in servers:
        fake.close()


@pytest.fixture
def session(team, owner, repository) -> Session:
    return start_session(
        team=team, repository=repository, prompt="Fix the bug", model="scripted/demo", created_by=owner
    )


@pytest.fixture
def run(session) -> Run:
    run = session.runs.get()
    assert run.claim("test")
    return run


@pytest.fixture
def handle(loop_settings, session):
    provider = LocalProvider()
    # Without this, `python3 -m unittest` right after a same-size edit in the same second reuses the
    # stale __pycache__ (pyc validation is by mtime in seconds and size), and the fix looks broken.
    spec = SandboxSpec(session_id=session.pk, env={"PYTHONDONTWRITEBYTECODE": "1"})
    handle = provider.create(spec)
    for path in sorted(SAMPLE_REPO.iterdir()):
        if path.is_file():
            handle.write_file(path.name, path.read_bytes())
    yield handle
    provider.destroy(handle.id)


def conversation(session, handle, prompt: str = "Fix the bug") -> list[dict]:
    return [
        {"role": "system", "content": build_system_prompt(session, handle)},
        {"role": "user", "content": prompt},
    ]


def run_events(run) -> list[Event]:
    """What the loop emitted: the run's events after the two its claim writes."""
    return list(Event.objects.filter(run=run).exclude(type__in=("run_started", "status")).order_by("seq"))


def assert_gap_free(session) -> None:
    seqs = list(Event.objects.filter(session=session).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert Session.objects.get(pk=session.pk).last_seq == len(seqs)


def assert_every_tool_call_answered(transcript: list[dict]) -> None:
    """A follow-up run sends the transcript back; providers reject unanswered tool calls."""
    asked = [c["id"] for m in transcript if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    answered = [m["tool_call_id"] for m in transcript if m["role"] == "tool"]
    assert asked == answered


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


FIX_SCRIPT = {
    "responses": [
        {
            "content": "I will run the tests first.",
            "tool_calls": [
                call("todo_write", todos=[{"content": "Fix add()", "status": "in_progress"}]),
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10},
        },
        {
            "tool_calls": [call("bash", command="python3 -m unittest 2>&1")],
            "usage": {"prompt_tokens": 200, "completion_tokens": 5, "cached_tokens": 100},
        },
        {
            "tool_calls": [call("read_file", path="calc.py")],
            "usage": {"prompt_tokens": 300, "completion_tokens": 5, "cached_tokens": 200},
        },
        {
            "content": "add() subtracts; fixing it.",
            "tool_calls": [
                call("edit_file", path="calc.py", old_string="return a - b", new_string="return a + b")
            ],
            "usage": {"prompt_tokens": 400, "completion_tokens": 20, "cached_tokens": 300},
        },
        {
            "tool_calls": [
                call("report_progress", message="Fixed add(); running the tests again"),
                call("bash", command="python3 -m unittest 2>&1"),
            ],
            "usage": {"prompt_tokens": 500, "completion_tokens": 10, "cached_tokens": 400},
        },
        {
            "tool_calls": [call("finish", summary="Fixed add() in calc.py; the tests pass.")],
            "usage": {"prompt_tokens": 600, "completion_tokens": 15, "cached_tokens": 500},
        },
    ]
}


def test_it_fixes_the_bug_with_a_scripted_model(scripted, session, run, handle, loop_settings):
    fake = scripted(FIX_SCRIPT)
    result = run_agent(run, handle, conversation(session, handle))

    assert (result.status, result.error) == ("completed", "")
    assert result.summary == "Fixed add() in calc.py; the tests pass."
    assert b"return a + b" in handle.read_file("calc.py")

    events = run_events(run)
    assert [e.type for e in events] == [
        *("usage", "assistant_text", "tool_started", "tool_finished", "todo"),
        *("usage", "tool_started", "tool_finished"),
        *("usage", "tool_started", "tool_finished"),
        *("usage", "assistant_text", "tool_started", "tool_finished"),
        *("usage", "tool_started", "tool_finished", "progress", "tool_started", "tool_finished"),
        *("usage", "tool_started", "tool_finished"),
    ]
    assert_gap_free(session)
    finished = [e.payload for e in events if e.type == "tool_finished"]
    assert [(p["name"], p["ok"]) for p in finished] == [
        ("todo_write", True),
        ("bash", False),  # the failing test run
        ("read_file", True),
        ("edit_file", True),
        ("report_progress", True),
        ("bash", True),
        ("finish", True),
    ]
    assert "FAILED" in finished[1]["output"] and "OK" in finished[5]["output"]
    assert not any(p["truncated"] for p in finished)
    started = [e.payload for e in events if e.type == "tool_started"]
    assert started[3]["arguments"] == FIX_SCRIPT["responses"][3]["tool_calls"][0]["arguments"]
    assert started[0]["call_id"] == finished[0]["call_id"] == "call_0_0"
    assert events[4].payload == {"todos": [{"content": "Fix add()", "status": "in_progress"}]}
    assert events[1].payload == {"text": "I will run the tests first."}
    assert [e.payload for e in events if e.type == "progress"] == [
        {"message": "Fixed add(); running the tests again"}
    ]

    # One LLMCall per call, and totals that add up to the script's usage.
    calls = list(LLMCall.objects.filter(run=run).order_by("pk"))
    assert [(c.outcome, c.status_code, c.provider, c.model) for c in calls] == [
        ("ok", 200, "scripted", "demo")
    ] * 6
    assert sum(c.input_tokens for c in calls) == 2100
    assert sum(c.cached_tokens for c in calls) == 1500
    assert sum(c.output_tokens for c in calls) == 65
    # (2100 - 1500) * $1 + 1500 * $0.25 + 65 * $4, per million tokens
    expected_cost = Decimal("0.001235")
    assert sum(c.cost_usd for c in calls) == expected_cost
    run.refresh_from_db()
    session.refresh_from_db()
    assert (run.input_tokens, run.output_tokens, run.cached_tokens, run.cost_usd) == (
        2100,
        65,
        1500,
        expected_cost,
    )
    assert (session.input_tokens, session.output_tokens, session.cost_usd) == (2100, 65, expected_cost)
    assert run.steps == 6
    usage_events = [e.payload for e in events if e.type == "usage"]
    assert usage_events[0] == {
        "input_tokens": 100,
        "output_tokens": 10,
        "cached_tokens": 0,
        "cost_usd": "0.000140",
        "model": "scripted/demo",
    }

    # What the model was sent: the whole conversation each time, tools and max_tokens always.
    bodies = [r["body"] for r in fake.requests]
    assert len(bodies) == 6
    assert all(b["max_tokens"] == 777 and b["model"] == "demo" for b in bodies)
    offered = [s["name"] for s in TOOL_SPECS + SESSION_TOOL_SPECS]  # a top-level session may spawn children
    assert all([t["function"]["name"] for t in b["tools"]] == offered for b in bodies)
    assert [sum(m["role"] == "assistant" for m in b["messages"]) for b in bodies] == [0, 1, 2, 3, 4, 5]
    read_result = bodies[3]["messages"][-1]
    assert read_result["role"] == "tool" and "return a - b" in read_result["content"]
    assert handle.workspace in bodies[0]["messages"][0]["content"]

    assert result.transcript[:2] == conversation(session, handle)
    assert_every_tool_call_answered(result.transcript)
    assert "test-key" not in json.dumps([e.payload for e in events])


def test_it_reports_unknown_tools_and_bad_arguments_to_the_model(scripted, session, run, handle):
    fake = scripted(
        {
            "responses": [
                {"tool_calls": [call("no_such_tool", x=1)]},
                {"tool_calls": [{"name": "read_file", "arguments": "{not json"}]},
                {"tool_calls": [call("read_file", file="calc.py")]},
                {"tool_calls": [call("read_file", path="../../etc/passwd")]},
                {"content": "I give up politely."},
            ]
        }
    )
    result = run_agent(run, handle, conversation(session, handle))

    assert (result.status, result.summary) == ("completed", "I give up politely.")
    finished = [e.payload for e in run_events(run) if e.type == "tool_finished"]
    assert [p["ok"] for p in finished] == [False] * 4
    assert all(p["output"].startswith("error: ") for p in finished)
    assert "unknown tool 'no_such_tool'" in finished[0]["output"]
    assert "not valid JSON" in finished[1]["output"]
    assert "'path' is required" in finished[2]["output"]
    assert "outside the workspace" in finished[3]["output"]
    # Invalid JSON still shows up in the event stream, as the raw text.
    started = [e.payload for e in run_events(run) if e.type == "tool_started"]
    assert started[1]["arguments"] == "{not json"
    # Each error went back to the model as the tool result, and the loop went on.
    bodies = [r["body"] for r in fake.requests]
    assert len(bodies) == 5
    assert bodies[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_0_0",
        "content": finished[0]["output"],
    }
    assert_every_tool_call_answered(result.transcript)
    assert_gap_free(session)


def test_it_fails_at_the_step_limit(scripted, session, run, handle, loop_settings):
    loop_settings.AGENT_MAX_STEPS = 3
    scripted(
        {"responses": [{"tool_calls": [call("report_progress", message=f"step {i}")]} for i in range(5)]}
    )
    result = run_agent(run, handle, conversation(session, handle))

    assert (result.status, result.error) == ("failed", "step limit (3) reached")
    assert LLMCall.objects.filter(run=run).count() == 3
    assert [e.payload["message"] for e in run_events(run) if e.type == "progress"] == [
        "step 0",
        "step 1",
        "step 2",
    ]
    assert Run.objects.get(pk=run.pk).steps == 3
    assert_every_tool_call_answered(result.transcript)


def test_it_does_not_call_the_model_for_a_cancelled_run(scripted, session, run, handle):
    fake = scripted({"responses": [{"content": "never"}]})
    session.cancel()
    result = run_agent(run, handle, conversation(session, handle))
    assert result.status == "cancelled"
    assert fake.requests == []
    assert LLMCall.objects.filter(run=run).count() == 0


@pytest.mark.django_db(transaction=True)
def test_it_stops_between_tool_calls_when_cancelled_mid_run(scripted, team, owner, repository, loop_settings):
    """The cancel is committed from the server thread while "the model is thinking" about step 2."""
    session = start_session(
        team=team, repository=repository, prompt="Fix", model="scripted/demo", created_by=owner
    )
    run = session.runs.get()
    assert run.claim("test")
    provider = LocalProvider()
    handle = provider.create(SandboxSpec(session_id=session.pk))
    fake = scripted(
        {
            "responses": [
                {"tool_calls": [call("report_progress", message="one")]},
                {
                    "tool_calls": [
                        call("write_file", path="first.txt", content="1"),
                        call("write_file", path="second.txt", content="2"),
                    ]
                },
                {"content": "never reached"},
            ]
        }
    )

    def cancel_on_second_request(body: dict) -> None:
        if sum(m["role"] == "assistant" for m in body["messages"]) == 1:
            try:
                Session.objects.get(pk=session.pk).cancel()
            finally:
                connection.close()  # this thread's own connection

    fake.on_request = cancel_on_second_request
    try:
        result = run_agent(run, handle, conversation(session, handle))
        assert result.status == "cancelled"
        assert handle.list_files() == ["first.txt"]  # the call in flight finished, the next did not run
        assert len(fake.requests) == 2
        assert [e.payload["name"] for e in run_events(run) if e.type == "tool_finished"] == [
            "report_progress",
            "write_file",
        ]
        assert result.transcript[-1]["content"] == "not run: the run was cancelled"
        assert_every_tool_call_answered(result.transcript)
        assert Run.objects.get(pk=run.pk).status == Run.Status.CANCELLED
    finally:
        provider.destroy(handle.id)


def test_it_keeps_long_tool_output_as_an_artifact(scripted, session, run, handle, loop_settings):
    loop_settings.TOOL_OUTPUT_LIMIT = 400
    fake = scripted(
        {
            "responses": [
                {"tool_calls": [call("bash", command="seq 1 2000")]},
                {"content": "Counted."},
            ]
        }
    )
    result = run_agent(run, handle, conversation(session, handle))

    assert result.status == "completed"
    types = [e.type for e in run_events(run)]
    assert types[:4] == ["usage", "tool_started", "artifact_created", "tool_finished"]
    finished = next(e.payload for e in run_events(run) if e.type == "tool_finished")
    assert finished["truncated"] is True
    artifact = Artifact.objects.get(pk=finished["artifact_id"])
    assert artifact.kind == "tool_output" and artifact.run_id == run.pk
    with artifact.file.open("rb") as fh:
        full = fh.read().decode()
    assert full.startswith("1\n2\n") and "\n2000\n" in full
    shown = finished["output"]
    assert shown.startswith("1\n2\n") and shown.rstrip().endswith("[exit code 0]")
    assert f"artifact {artifact.pk}" in shown
    assert len(shown) < 400 + 200
    assert fake.requests[1]["body"]["messages"][-1]["content"] == shown


def test_it_records_retries_and_fails_when_the_model_keeps_failing(scripted, session, run, handle):
    scripted(
        {
            "responses": [
                {
                    "content": "thinking",
                    "tool_calls": [call("report_progress", message="hi")],
                    "faults": [{"status": 500}],
                },
                {"content": "never", "faults": [{"status": 502}] * 10},
            ]
        }
    )
    result = run_agent(run, handle, conversation(session, handle))

    assert result.status == "failed"
    assert "failed after 3 attempts" in result.error and "HTTP 502" in result.error
    calls = list(LLMCall.objects.filter(run=run).order_by("pk"))
    assert [(c.outcome, c.status_code) for c in calls] == [
        ("retry", 500),
        ("ok", 200),
        ("retry", 502),
        ("retry", 502),
        ("error", 502),
    ]
    assert all(c.input_tokens == 0 and c.cost_usd == 0 for c in calls if c.outcome != "ok")
    errors = [e.payload for e in run_events(run) if e.type == "llm_error"]
    assert [(p["attempt"], p["will_retry"]) for p in errors] == [(1, True), (1, True), (2, True), (3, False)]
    run.refresh_from_db()
    assert run.input_tokens == calls[1].input_tokens > 0  # only the successful call counts
    assert_gap_free(session)


def test_it_continues_the_conversation_in_a_follow_up(scripted, session, run, handle):
    fake = scripted({"responses": [{"content": "First answer."}, {"content": "Second answer."}]})
    first = run_agent(run, handle, conversation(session, handle))
    assert (first.status, first.summary) == ("completed", "First answer.")
    follow_up = [*first.transcript, {"role": "user", "content": "And now?"}]
    second = run_agent(run, handle, follow_up)
    assert (second.status, second.summary) == ("completed", "Second answer.")
    assert [m["role"] for m in second.transcript] == ["system", "user", "assistant", "user", "assistant"]
    assert len(fake.requests) == 2


def test_it_fails_cleanly_for_an_unknown_provider(loop_settings, session, run, handle):
    loop_settings.LLM_PROVIDERS = {
        "openai": {"kind": "openai", "base_url": "http://127.0.0.1:1", "api_key": ""}
    }
    result = run_agent(run, handle, conversation(session, handle))
    assert result.status == "failed"
    assert "unknown LLM provider 'scripted'" in result.error and "openai" in result.error
    assert not run_events(run)


def test_it_runs_the_bundled_demo_script_and_its_follow_up(scripted, session, run, handle):
    script = json.loads((SAMPLE_REPO.parent / "script.json").read_text())
    scripted(script)
    first = run_agent(run, handle, conversation(session, handle, "Make the failing test pass"))
    assert (first.status, first.error) == ("completed", "")
    assert "add()" in first.summary
    assert b"return a + b" in handle.read_file("calc.py")

    follow_up = [*first.transcript, {"role": "user", "content": "Add a changelog entry"}]
    second = run_agent(run, handle, follow_up)
    assert (second.status, second.summary) == ("completed", "Added a CHANGELOG entry for the fix.")
    assert b"Fixed add()" in handle.read_file("CHANGELOG.md")
    assert_every_tool_call_answered(second.transcript)
    assert LLMCall.objects.filter(run=run, outcome="ok").count() == len(script["responses"])
    assert_gap_free(session)

"""Context compaction: old tool output is elided before the conversation outgrows its budget."""

from __future__ import annotations

import pytest

from sessions.agent.context import KEEP_RECENT, compact, transcript_size
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Event, Run, start_session
from sessions.runner import execute


def conversation(tool_outputs: int, size: int) -> list[dict]:
    messages = [{"role": "system", "content": "s" * 5000}, {"role": "user", "content": "u" * 5000}]
    for n in range(tool_outputs):
        call = {
            "id": f"c{n}",
            "type": "function",
            "function": {"name": "bash", "arguments": '{"command": "ls"}'},
        }
        messages.append({"role": "assistant", "content": "a" * 300, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"c{n}", "content": f"{n}:" + "o" * size})
    return messages


def test_it_leaves_a_conversation_within_budget_alone():
    messages = conversation(3, 100)
    assert compact(messages, 1_000_000) == (messages, None)


def test_it_elides_old_tool_output_first_and_keeps_the_conversation_valid():
    messages = conversation(20, 3000)
    budget = 50_000
    compacted, done = compact(messages, budget)

    assert done is not None and done.chars_before == transcript_size(messages)
    assert done.chars_after == transcript_size(compacted) <= budget * 0.75
    assert compacted[:2] == messages[:2]  # system prompt and the task
    assert compacted[-KEEP_RECENT:] == messages[-KEEP_RECENT:]
    elided = [m for m in compacted if "elided to keep the conversation" in (m.get("content") or "")]
    assert len(elided) == done.elided and all(m["role"] == "tool" for m in elided)
    first_kept = next(i for i, m in enumerate(compacted) if m["role"] == "tool" and m not in elided)
    assert all(m not in elided for m in compacted[first_kept:])  # oldest first
    for before, after in zip(messages, compacted, strict=True):
        assert (before["role"], before.get("tool_calls"), before.get("tool_call_id")) == (
            after["role"],
            after.get("tool_calls"),
            after.get("tool_call_id"),
        )
    assert compact(compacted, budget) == (compacted, None)  # nothing more to do at the next step


def test_it_elides_old_assistant_text_when_tool_output_is_not_enough():
    messages = conversation(12, 10)
    for m in messages:
        if m["role"] == "assistant":
            m["content"] = "a" * 4000
    compacted, done = compact(messages, 30_000)
    assert done is not None
    assert any(m["role"] == "assistant" and "elided" in m["content"] for m in compacted)
    assert compacted[-KEEP_RECENT:] == messages[-KEEP_RECENT:]


@pytest.fixture
def run_settings(run_settings):
    run_settings.CONTEXT_CHARS = 12_000
    return run_settings


def test_a_long_run_stays_within_its_context_budget(run_settings, team, owner, repository):
    noisy = {"name": "bash", "arguments": {"command": "head -c 2500 /dev/zero | tr '\\0' x"}}
    script = {"responses": [{"tool_calls": [noisy]}] * 12 + [{"content": "Done."}]}
    session = start_session(
        team=team, repository=repository, prompt="Go", model="scripted/demo", created_by=owner
    )
    with start_in_thread(script) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
        sizes = [transcript_size(r["body"]["messages"]) for r in fake.requests]

    run = session.runs.get()
    assert run.status == Run.Status.COMPLETED, run.error
    assert len(sizes) == 13
    assert max(sizes) <= 12_000 + 2600  # one step may add one output before the next compaction
    compactions = [e.payload for e in Event.objects.filter(run=run, type="context_compacted")]
    assert compactions and all(c["chars_after"] < c["chars_before"] for c in compactions)
    assert all("x" * 2500 in e.payload["output"] for e in Event.objects.filter(run=run, type="tool_finished"))

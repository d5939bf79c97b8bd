"""The scripted model server, driven over real HTTP with httpx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sessions.agent.fake_llm import EXHAUSTED_TEXT, main, start_in_thread

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = {
    "responses": [
        {"content": "Looking.", "tool_calls": [{"name": "read_file", "arguments": {"path": "calc.py"}}]},
        {"content": "All done."},
    ]
}


@pytest.fixture
def fake():
    with start_in_thread(SCRIPT) as server:
        yield server


def chat(fake, messages, **extra) -> httpx.Response:
    body = {"model": "demo", "messages": messages, **extra}
    return httpx.post(f"{fake.base_url}/chat/completions", json=body, timeout=10)


def conversation(user: str = "fix it", assistants: int = 0) -> list[dict]:
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": user}]
    for i in range(assistants):
        messages.append({"role": "assistant", "content": f"turn {i}"})
        messages.append({"role": "user", "content": "go on"})
    return messages


def test_it_walks_the_script_by_counting_assistant_messages(fake):
    first = chat(fake, conversation()).json()
    assert first["object"] == "chat.completion"
    assert first["model"] == "demo"
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Looking."
    call = choice["message"]["tool_calls"][0]
    assert call == {
        "id": "call_0_0",
        "type": "function",
        "function": {"name": "read_file", "arguments": json.dumps({"path": "calc.py"})},
    }

    second = chat(fake, conversation(assistants=1)).json()["choices"][0]
    assert second["finish_reason"] == "stop"
    assert second["message"]["content"] == "All done."
    assert "tool_calls" not in second["message"]

    # Another conversation starts at the top again; the first one can be asked again too.
    assert chat(fake, conversation("other task")).json()["choices"][0]["finish_reason"] == "tool_calls"
    assert chat(fake, conversation()).json()["choices"][0]["message"]["content"] == "Looking."


def test_it_answers_with_a_marker_when_the_script_is_exhausted(fake):
    choice = chat(fake, conversation(assistants=2)).json()["choices"][0]
    assert choice["message"]["content"] == EXHAUSTED_TEXT
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]


def test_it_computes_predictable_usage_unless_the_script_gives_it():
    script = {
        "responses": [
            {"content": "abcdefgh"},
            {"content": "x", "usage": {"prompt_tokens": 100, "completion_tokens": 7, "cached_tokens": 40}},
        ]
    }
    with start_in_thread(script) as fake:
        messages = [{"role": "system", "content": "s" * 10}, {"role": "user", "content": "u" * 30}]
        usage = chat(fake, messages).json()["usage"]
        # prompt: 40 characters of content // 4; completion: 8 characters // 4 + 1
        assert usage == {
            "prompt_tokens": 10,
            "completion_tokens": 3,
            "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        messages.append({"role": "assistant", "content": "abcdefgh"})
        usage = chat(fake, messages).json()["usage"]
        assert usage["prompt_tokens"] == 100
        assert usage["completion_tokens"] == 7
        assert usage["total_tokens"] == 107
        assert usage["prompt_tokens_details"]["cached_tokens"] == 40


def test_it_serves_faults_before_the_answer_per_conversation():
    script = {
        "responses": [
            {
                "content": "finally",
                "faults": [
                    {"status": 500},
                    {"status": 429, "retry_after": 0.05},
                    {"body": "not json at all"},
                ],
            }
        ]
    }
    with start_in_thread(script) as fake:
        first = chat(fake, conversation())
        assert first.status_code == 500
        assert first.json()["error"]["type"] == "server_error"
        second = chat(fake, conversation())
        assert second.status_code == 429
        assert second.headers["Retry-After"] == "0.05"
        third = chat(fake, conversation())
        assert third.status_code == 200
        assert third.text == "not json at all"
        assert chat(fake, conversation()).json()["choices"][0]["message"]["content"] == "finally"
        # A different conversation gets its own fault sequence.
        assert chat(fake, conversation("another")).status_code == 500


def test_it_can_drop_the_connection_as_a_fault():
    script = {"responses": [{"content": "ok", "faults": [{"disconnect": True}]}]}
    with start_in_thread(script) as fake:
        with pytest.raises(httpx.TransportError):
            chat(fake, conversation())
        assert chat(fake, conversation()).json()["choices"][0]["message"]["content"] == "ok"


def test_it_streams_server_sent_events_that_add_up_to_the_message():
    script = {
        "responses": [
            {
                "content": "I will read two files, then decide what to do next.",
                "tool_calls": [
                    {"name": "read_file", "arguments": {"path": "a_rather_long_file_name.py"}},
                    {"name": "bash", "arguments": {"command": "python3 -m unittest -v"}},
                ],
                "usage": {"prompt_tokens": 50, "completion_tokens": 20},
            }
        ]
    }
    with start_in_thread(script) as fake:
        body = {
            "model": "demo",
            "messages": conversation(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks = []
        with httpx.stream("POST", f"{fake.base_url}/chat/completions", json=body, timeout=10) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            assert line.startswith("data: ")
            chunks.append(json.loads(line[len("data: ") :]))

    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    content, calls, finish, usage = "", {}, None, None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += call.get("function", {}).get("name") or ""
                slot["arguments"] += call.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    assert content == script["responses"][0]["content"]
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["read_file", "bash"]
    assert calls[0]["id"] == "call_0_0"
    assert json.loads(calls[1]["arguments"]) == {"command": "python3 -m unittest -v"}
    assert usage["prompt_tokens"] == 50 and usage["total_tokens"] == 70


def test_it_records_requests_without_credentials(fake):
    httpx.post(
        f"{fake.base_url}/chat/completions",
        json={"model": "demo", "messages": conversation(), "max_tokens": 123},
        headers={"Authorization": "Bearer sk-secret"},
        timeout=10,
    )
    # The alias path without /v1 works too.
    base = fake.base_url.removesuffix("/v1")
    httpx.post(f"{base}/chat/completions", json={"model": "demo", "messages": conversation()}, timeout=10)
    recorded = fake.requests
    assert [r["path"] for r in recorded] == ["/v1/chat/completions", "/chat/completions"]
    assert recorded[0]["body"]["max_tokens"] == 123
    assert recorded[0]["headers"]["authorization"] == "[redacted]"
    over_http = httpx.get(f"{base}/_requests", timeout=10).json()
    assert over_http[0]["body"]["max_tokens"] == 123
    assert "sk-secret" not in json.dumps(over_http)


def test_it_answers_health_and_model_listing(fake):
    base = fake.base_url.removesuffix("/v1")
    assert httpx.get(f"{base}/healthz", timeout=10).json()["scripted"] is True
    models = httpx.get(f"{fake.base_url}/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "scripted"
    assert chat(fake, "not a list").status_code == 400


def test_it_rejects_a_bad_script_file_with_a_clear_message(tmp_path, capsys):
    assert main(["--script", str(tmp_path / "missing.json"), "--port", "0"]) == 2
    assert "bad script" in capsys.readouterr().err

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["--script", str(broken), "--port", "0"]) == 2
    assert "not valid JSON" in capsys.readouterr().err

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"responses": [{"contnet": "typo"}]}))
    assert main(["--script", str(wrong), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "responses[0]" in err and "contnet" in err


def test_it_serves_from_the_command_line_until_interrupted(tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    code = "import sys; from sessions.agent.fake_llm import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--script", str(script), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()
        assert "SCRIPTED" in line and "not a real LLM" in line
        url = next(word for word in line.split() if word.startswith("http://"))
        # The socket listens before the line is printed, so no waiting is needed.
        response = httpx.post(
            f"{url}/chat/completions", json={"model": "m", "messages": conversation()}, timeout=5
        )
        assert response.json()["choices"][0]["message"]["content"] == "Looking."
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""Model clients against real HTTP servers on loopback: the scripted server and a tiny Anthropic fake."""

from __future__ import annotations

import json
import socket
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import httpx
import pytest
from httpcore._sync.connection_pool import PoolRequest

from sessions.agent.fake_llm import start_in_thread
from sessions.agent.llm import (
    AnthropicClient,
    CircuitOpen,
    LLMConfigError,
    LLMError,
    OpenAIClient,
    Usage,
    _Pool,
    client_for,
    cost_usd,
    new_pool,
    resolve_model,
    shared_pool,
    to_anthropic_messages,
)

MESSAGES = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Fix the bug"}]
TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    }
]


@pytest.fixture
def llm_settings(settings):
    settings.LLM_RETRY_BASE_DELAY = 0.001
    settings.LLM_MAX_RETRIES = 3
    settings.LLM_MAX_TOKENS = 321
    settings.LLM_TIMEOUT = 5.0
    return settings


def scripted(settings, script: dict, api_key: str = "test-key"):
    fake = start_in_thread(script)
    settings.LLM_PROVIDERS = {"scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": api_key}}
    return fake


def call(records: list | None = None, **kwargs):
    with client_for("scripted/demo", **kwargs) as client:
        return client.complete(MESSAGES, TOOLS, on_attempt=records.append if records is not None else None)


def test_it_parses_a_tool_call_and_sends_tools_in_function_format(llm_settings):
    script = {
        "responses": [
            {
                "content": "Reading.",
                "tool_calls": [{"name": "read_file", "arguments": {"path": "calc.py"}}],
                "usage": {"prompt_tokens": 120, "completion_tokens": 12, "cached_tokens": 100},
            }
        ]
    }
    with scripted(llm_settings, script) as fake:
        records = []
        response = call(records)
        body = fake.requests[0]["body"]
        headers = fake.requests[0]["headers"]
    assert response.text == "Reading."
    assert response.finish_reason == "tool_calls"
    assert response.status_code == 200
    assert [(c.id, c.name, json.loads(c.arguments)) for c in response.tool_calls] == [
        ("call_0_0", "read_file", {"path": "calc.py"})
    ]
    assert response.usage == Usage(input_tokens=120, output_tokens=12, cached_tokens=100)
    assert body["model"] == "demo"
    assert body["tools"] == [{"type": "function", "function": TOOLS[0]}]
    assert body["messages"] == MESSAGES
    assert headers["authorization"] == "[redacted]"  # sent, and not recorded in clear
    assert (headers["content-type"], headers["accept-encoding"]) == ("application/json", "identity")
    assert [(r.outcome, r.status_code, r.attempt) for r in records] == [("ok", 200, 1)]
    assert records[0].usage == response.usage
    assert response.to_message() == {
        "role": "assistant",
        "content": "Reading.",
        "tool_calls": [
            {
                "id": "call_0_0",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "calc.py"}'},
            }
        ],
    }


def test_it_retries_a_server_error_and_records_each_attempt(llm_settings):
    script = {"responses": [{"content": "recovered", "faults": [{"status": 500}]}]}
    with scripted(llm_settings, script) as fake:
        records = []
        response = call(records)
        bodies = [r["body"] for r in fake.requests]
    assert response.text == "recovered"
    assert [(r.outcome, r.status_code) for r in records] == [("retry", 500), ("ok", 200)]
    assert "HTTP 500" in records[0].error
    assert records[0].usage is None
    assert len(bodies) == 2
    assert all(body["max_tokens"] == 321 for body in bodies)


def test_it_honours_retry_after_on_429(llm_settings):
    script = {"responses": [{"content": "ok", "faults": [{"status": 429, "retry_after": 0.3}]}]}
    with scripted(llm_settings, script) as fake:
        records = []
        call(records)
        first, second = (r["received_at"] for r in fake.requests)
    assert second - first >= 0.3
    assert [(r.outcome, r.status_code) for r in records] == [("retry", 429), ("ok", 200)]


def test_it_retries_a_malformed_body(llm_settings):
    script = {
        "responses": [{"content": "ok", "faults": [{"body": "not json at all"}, {"body": '{"choices": []}'}]}]
    }
    with scripted(llm_settings, script):
        records = []
        response = call(records)
    assert response.text == "ok"
    assert [(r.outcome, r.status_code) for r in records] == [("retry", 200), ("retry", 200), ("ok", 200)]
    assert "malformed response body" in records[0].error
    assert "not json at all" in records[0].error


def test_it_retries_dropped_connections_and_timeouts(llm_settings):
    llm_settings.LLM_TIMEOUT = 0.2
    script = {"responses": [{"content": "ok", "faults": [{"disconnect": True}, {"delay": 1.0}]}]}
    with scripted(llm_settings, script):
        records = []
        response = call(records)
    assert response.text == "ok"
    assert [r.outcome for r in records] == ["retry", "retry", "ok"]
    assert "connection error" in records[0].error
    assert "timed out" in records[1].error


def test_it_gives_up_after_the_maximum_retries(llm_settings):
    llm_settings.LLM_MAX_RETRIES = 2
    script = {"responses": [{"content": "never", "faults": [{"status": 503}] * 10}]}
    with scripted(llm_settings, script) as fake:
        records = []
        with pytest.raises(LLMError) as caught:
            call(records)
        assert len(fake.requests) == 3
    assert caught.value.status_code == 503
    assert "after 3 attempts" in str(caught.value)
    assert [r.outcome for r in records] == ["retry", "retry", "error"]


def test_it_fails_at_once_on_a_client_error_without_leaking_the_key(llm_settings):
    key = "sk-very-secret-key-123"
    script = {
        "responses": [{"content": "never", "faults": [{"status": 401, "body": f"bad key {key} given"}]}]
    }
    with scripted(llm_settings, script, api_key=key) as fake:
        records = []
        with pytest.raises(LLMError) as caught:
            call(records)
        assert len(fake.requests) == 1
    assert caught.value.status_code == 401
    assert key not in str(caught.value)
    assert "[redacted]" in str(caught.value)
    assert [(r.outcome, r.status_code) for r in records] == [("error", 401)]
    assert key not in records[0].error


def test_it_fails_a_bad_request_without_retrying(llm_settings):
    script = {"responses": [{"content": "never", "faults": [{"status": 400}]}]}
    with scripted(llm_settings, script) as fake:
        with pytest.raises(LLMError, match="HTTP 400"):
            call()
        assert len(fake.requests) == 1


def test_it_opens_the_circuit_after_repeated_failed_calls(llm_settings):
    llm_settings.LLM_MAX_RETRIES = 0
    llm_settings.LLM_BREAKER_THRESHOLD = 2
    llm_settings.LLM_BREAKER_COOLDOWN = 60
    script = {"responses": [{"content": "never", "faults": [{"status": 500}] * 10}]}
    with scripted(llm_settings, script) as fake:
        for _ in range(2):
            with pytest.raises(LLMError):
                call()
        records = []
        with pytest.raises(CircuitOpen, match="circuit open"):
            call(records)
        assert len(fake.requests) == 2  # the third call never reached the server
    assert [(r.outcome, r.status_code) for r in records] == [("error", None)]


def test_it_resolves_models_and_explains_bad_ones(llm_settings):
    llm_settings.LLM_PROVIDERS = {
        "local": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1/", "api_key": "k"},
        "claude": {"kind": "anthropic", "base_url": "https://api.anthropic.com", "api_key": "k"},
    }
    provider, model = resolve_model("local/org/model-7b")
    assert (provider.name, provider.kind, provider.base_url, model) == (
        "local",
        "openai",
        "http://127.0.0.1:1/v1",
        "org/model-7b",
    )
    assert "k" not in repr(provider).replace("kind", "")
    with pytest.raises(LLMConfigError, match="claude, local"):
        resolve_model("nope/model")
    with pytest.raises(LLMConfigError, match="provider/model"):
        resolve_model("just-a-model")
    with client_for("claude/claude-sonnet-4-5") as client:
        assert isinstance(client, AnthropicClient)
    with client_for("local/m") as client:
        assert isinstance(client, OpenAIClient)


def test_it_computes_cost_from_the_price_table(llm_settings):
    llm_settings.LLM_PRICES = {
        "scripted/demo": {"input": 2.0, "output": 10.0, "cached": 0.5},
        "gpt-4o": {"input": 2.5, "output": 10.0},
    }
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000, cached_tokens=400_000)
    # 600k uncached * $2 + 400k cached * $0.50 + 100k output * $10, per million
    assert cost_usd("scripted/demo", usage) == Decimal("2.400000")
    # Bare model names and dated variants find the same price; no cached rate -> the input rate.
    assert cost_usd("openai/gpt-4o", usage) == Decimal("3.500000")
    assert cost_usd("openai/gpt-4o-2024-08-06", usage) == Decimal("3.500000")
    assert cost_usd("openai/unknown-model", usage) == Decimal("0")
    assert cost_usd("scripted/demo", Usage(input_tokens=7, output_tokens=3)) == Decimal("0.000044")


# --- Anthropic ------------------------------------------------------------------------------------


class AnthropicFake:
    """Just enough of the Messages API to check what the client sends and how it reads the answer."""

    def __init__(self, reply: dict, status: int = 200):
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


CONVERSATION = [
    {"role": "system", "content": "Be careful."},
    {"role": "user", "content": "Fix calc.py"},
    {
        "role": "assistant",
        "content": "Reading both.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "a"}'},
            },
            {"id": "toolu_2", "type": "function", "function": {"name": "read_file", "arguments": "{broken"}},
        ],
    },
    {"role": "tool", "tool_call_id": "toolu_1", "content": "A"},
    {"role": "tool", "tool_call_id": "toolu_2", "content": "error: bad arguments"},
    {"role": "user", "content": "Also add a test."},
]

ANTHROPIC_REPLY = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "text", "text": "Editing now."},
        {"type": "tool_use", "id": "toolu_3", "name": "edit_file", "input": {"path": "calc.py", "old": "-"}},
    ],
    "stop_reason": "tool_use",
    "usage": {
        "input_tokens": 100,
        "output_tokens": 30,
        "cache_read_input_tokens": 900,
        "cache_creation_input_tokens": 50,
    },
}


def test_it_converts_the_conversation_for_anthropic_and_reads_the_answer(llm_settings):
    with AnthropicFake(ANTHROPIC_REPLY) as fake:
        llm_settings.LLM_PROVIDERS = {
            "anthropic": {"kind": "anthropic", "base_url": fake.base_url, "api_key": "ak-test"}
        }
        records = []
        with client_for("anthropic/claude-sonnet-4-5") as client:
            response = client.complete(CONVERSATION, TOOLS, on_attempt=records.append)
        sent = fake.requests[0]

    assert sent["path"] == "/v1/messages"
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers["x-api-key"] == "ak-test"
    assert headers["anthropic-version"] == "2023-06-01"
    body = sent["body"]
    assert body["model"] == "claude-sonnet-4-5"
    assert body["max_tokens"] == 321
    assert body["system"] == "Be careful."
    assert body["tools"] == [
        {"name": "read_file", "description": "Read a file", "input_schema": TOOLS[0]["parameters"]}
    ]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Fix calc.py"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Reading both."},
                {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a"}},
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "read_file",
                    "input": {"_unparsed_arguments": "{broken"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "A"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "error: bad arguments"},
                {"type": "text", "text": "Also add a test."},
            ],
        },
    ]

    assert response.text == "Editing now."
    assert response.finish_reason == "tool_calls"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in response.tool_calls] == [
        ("toolu_3", "edit_file", {"path": "calc.py", "old": "-"})
    ]
    # input_tokens counts every prompt token; cache reads are the cached part.
    assert response.usage == Usage(input_tokens=1050, output_tokens=30, cached_tokens=900)
    assert [(r.outcome, r.provider, r.model) for r in records] == [("ok", "anthropic", "claude-sonnet-4-5")]


def test_it_reports_anthropic_client_errors_without_retrying(llm_settings):
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: bad"}}
    with AnthropicFake(error, status=400) as fake:
        llm_settings.LLM_PROVIDERS = {
            "a": {"kind": "anthropic", "base_url": fake.base_url + "/v1", "api_key": "x"}
        }
        with client_for("a/claude-haiku-4-5") as client:
            with pytest.raises(LLMError, match="messages: bad"):
                client.complete(MESSAGES)
        assert len(fake.requests) == 1
        assert fake.requests[0]["path"] == "/v1/messages"  # a base URL ending in /v1 is not doubled


def test_it_keeps_only_text_when_converting_a_plain_conversation():
    system, turns = to_anthropic_messages(
        [
            {"role": "system", "content": "one"},
            {"role": "system", "content": "two"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ]
    )
    assert system == "one\n\ntwo"
    assert turns == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]}
    ]


@pytest.mark.parametrize(
    "base_url",
    ["ftp://example.invalid/v1", "127.0.0.1:8000/v1", "http://[::1/v1"],
    ids=["other-protocol", "no-scheme", "invalid"],
)
def test_it_fails_without_retrying_when_the_base_url_is_unusable(llm_settings, base_url):
    llm_settings.LLM_PROVIDERS = {"bad": {"kind": "openai", "base_url": base_url, "api_key": ""}}
    records = []
    with client_for("bad/m") as client, pytest.raises(LLMConfigError, match="base URL is not usable"):
        client.complete(MESSAGES, on_attempt=records.append)
    assert [r.outcome for r in records] == ["error"]


def test_it_sends_each_call_the_conversation_as_it_is_now(llm_settings):
    """Each call's body reuses the JSON of messages the previous call sent; a message replaced
    since (as compaction does) or dropped from the end is sent as it is now, and text outside ASCII
    is counted in bytes."""
    script = {"responses": [{"content": f"reply {n}"} for n in range(5)]}
    with scripted(llm_settings, script) as fake, client_for("scripted/demo") as client:
        conversation = [*MESSAGES]
        sent = []
        for turn in range(4):
            reply = client.complete(conversation, TOOLS if turn != 2 else None)
            sent.append(conversation[:])
            conversation.append(reply.to_message())
            conversation.append({"role": "user", "content": f"next, déjà vu ✓ {turn}"})
            if turn == 1:
                conversation[3] = {**conversation[3], "content": "[elided]"}
            if turn == 2:
                del conversation[-3:]
        bodies = [r["body"] for r in fake.requests]
    assert [body["messages"] for body in bodies] == sent
    assert [body.get("tools") for body in bodies] == [[{"type": "function", "function": TOOLS[0]}]] * 2 + [
        None,
        [{"type": "function", "function": TOOLS[0]}],
    ]
    assert [m["content"] for m in sent[2][3:]] == ["[elided]", "reply 1", "next, déjà vu ✓ 1"]
    assert len(sent[3]) == 5


# --- the shared client's connection pool ----------------------------------------------------------


def _idle_connection(pool, url: str):
    """``pool`` holding one idle kept-alive connection to ``url``'s server."""
    assert pool.request("GET", url).status == 200
    (connection,) = pool.connections
    assert connection.is_idle()
    return pool, connection


def _promised(pool, url: str):
    """A request the pool has given a connection to, whose thread has not started on it yet."""
    host = httpx.URL(url).netloc
    request = PoolRequest(httpcore.Request("GET", url, headers=[(b"Host", host)]))
    pool._requests.append(request)
    assert pool._assign_requests_to_connections() == []
    return request


@pytest.mark.parametrize("fixed", [True, False])
def test_a_connection_promised_to_a_request_is_not_closed_or_given_away_meanwhile(llm_settings, fixed):
    """encode/httpcore#1110: closed by another thread's pass after the request was sent, the socket
    goes away under a thread waiting for the answer (a model call hung for its read timeout).
    The plain pool (fixed=False) shows the race is real in the httpcore installed."""
    fake = start_in_thread({"responses": []})
    url = f"http://127.0.0.1:{fake.port}/healthz"
    try:
        plain = httpcore.ConnectionPool(max_connections=None, max_keepalive_connections=None)
        pool, connection = _idle_connection(new_pool() if fixed else plain, url)
        assert isinstance(pool, _Pool) == fixed
        first = _promised(pool, url)
        assert first.connection is connection
        # A second request in another thread's pass: the promised connection is not free.
        second = _promised(pool, url)
        assert (second.connection is connection) != fixed
        # Its keep-alive runs out before its thread starts the request on it; another pass runs.
        connection._connection._expire_at = time.monotonic() - 1
        closing = pool._assign_requests_to_connections()
        assert (connection in closing) != fixed
        if fixed:
            response = connection.handle_request(first.request)
            assert response.status == 200
            response.read()
    finally:
        fake.close()


def test_the_shared_pool_turns_nagle_off(llm_settings):
    fake = scripted(llm_settings, {"responses": [{"content": "hi"}]})
    try:
        assert call().text == "hi"
        (connection,) = shared_pool(fake.base_url).connections
        sock = connection._connection._network_stream.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        fake.close()

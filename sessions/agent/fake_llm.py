"""A scripted OpenAI-compatible chat server: it replays a script, it is not a model.

Tests, benchmarks and the offline demo talk to it over real HTTP, so the client, the retries and
the agent loop run exactly as they would against a provider. Stdlib only, so it starts anywhere.

Script format (JSON)::

    {"responses": [
        {"tool_calls": [{"name": "read_file", "arguments": {"path": "calc.py"}}]},
        {"content": "Fixed.", "usage": {"prompt_tokens": 10, "completion_tokens": 3},
         "delay": 0.2, "faults": [{"status": 500}, {"status": 429, "retry_after": 0.05}]}
    ]}

Which response is served is *stateless per conversation*: index = number of ``assistant`` messages
in the request. Concurrent conversations each walk the script from the start, and a follow-up run
(whose request carries the earlier turns) continues where the previous one stopped. Past the end
the server answers ``(scripted model: script exhausted)`` with no tool calls.

Response keys: ``content`` (str), ``tool_calls`` ([{name, arguments (object, or a string sent
verbatim, e.g. to script invalid JSON), id?}]), ``usage``, ``delay`` (seconds of "model latency"
before answering) and ``faults``.

``faults`` are served, in order, on the first attempts at that response before the real answer;
counters are per (conversation, index), conversation = hash of the first system and first user
message contents. A fault is an object with any of:

- ``status``: HTTP status (default 500, or 200 when ``body`` is given); ``{"status": 500}``
- ``retry_after``: seconds, sent as the ``Retry-After`` header; ``{"status": 429, "retry_after": 0.05}``
- ``body``: raw response body instead of a JSON error; ``{"body": "not json at all"}``
- ``delay``: seconds to wait before answering (to provoke client timeouts)
- ``disconnect``: true closes the connection without any response

Usage numbers, unless the response gives them (missing keys are filled in):

- ``prompt_tokens`` = total characters of the request messages' text content // 4 (string
  ``content`` plus the ``text`` of content parts; tool-call arguments are not counted)
- ``completion_tokens`` = (characters of the reply content + characters of every tool call's
  arguments JSON string) // 4 + 1
- ``cached_tokens`` = 0

Endpoints: ``POST /v1/chat/completions`` (and ``/chat/completions``; ``"stream": true`` gives
server-sent ``chat.completion.chunk`` events), ``GET /v1/models``, ``GET /healthz`` and
``GET /_requests`` (the recorded requests, newest last, credentials redacted).

Python API: ``start_in_thread(script) -> FakeLLM`` with ``.base_url``, ``.requests``, ``.close()``
(also a context manager) and ``.on_request``, a hook called with each chat request body before it is
answered. ``main(argv)`` is the ``deputies fake-llm`` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EXHAUSTED_TEXT = "(scripted model: script exhausted)"
MAX_RECORDED_REQUESTS = 500
DEFAULT_PORT = 8765
_RESPONSE_KEYS = {"content", "tool_calls", "usage", "delay", "faults"}
_FAULT_KEYS = {"status", "retry_after", "body", "delay", "disconnect"}
_SENSITIVE_HEADERS = {"authorization", "x-api-key", "api-key", "proxy-authorization"}


class ScriptError(ValueError):
    """The script is not usable; the message says where."""


def validate_script(script: Any) -> list[dict[str, Any]]:
    """Return the responses, or raise ScriptError naming the first problem."""
    if not isinstance(script, dict) or not isinstance(script.get("responses"), list):
        raise ScriptError('the script must be a JSON object with a "responses" list')
    responses = script["responses"]
    for i, response in enumerate(responses):
        where = f"responses[{i}]"
        if not isinstance(response, dict):
            raise ScriptError(f"{where} must be an object")
        unknown = set(response) - _RESPONSE_KEYS
        if unknown:
            raise ScriptError(
                f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(_RESPONSE_KEYS)}"
            )
        content = response.get("content")
        if content is not None and not isinstance(content, str):
            raise ScriptError(f"{where}.content must be a string")
        if not isinstance(response.get("tool_calls") or [], list):
            raise ScriptError(f"{where}.tool_calls must be a list")
        for n, call in enumerate(response.get("tool_calls") or []):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ScriptError(f'{where}.tool_calls[{n}] must be an object with a "name" string')
            if not isinstance(call.get("arguments", {}), dict | str):
                raise ScriptError(f"{where}.tool_calls[{n}].arguments must be an object or a string")
        usage = response.get("usage", {})
        if not isinstance(usage, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in usage.values()
        ):
            raise ScriptError(f"{where}.usage must be an object of integers")
        if not isinstance(response.get("delay", 0), int | float):
            raise ScriptError(f"{where}.delay must be a number of seconds")
        faults = response.get("faults", [])
        if not isinstance(faults, list):
            raise ScriptError(f"{where}.faults must be a list")
        for n, fault in enumerate(faults):
            if not isinstance(fault, dict) or set(fault) - _FAULT_KEYS:
                raise ScriptError(
                    f"{where}.faults[{n}] must be an object with keys from {sorted(_FAULT_KEYS)}"
                )
    return responses


def load_script(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            script = json.load(fh)
    except OSError as exc:
        raise ScriptError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ScriptError(f"{path} is not valid JSON: {exc}") from None
    validate_script(script)
    return script


# --- What to answer --------------------------------------------------------------------------


def _text_chars(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
    return total


def conversation_key(messages: list[Any]) -> str:
    """Hash of the first system and the first user message: stable across a conversation's turns."""
    first: dict[str, str] = {}
    for message in messages:
        if isinstance(message, dict) and message.get("role") in ("system", "user"):
            first.setdefault(message["role"], json.dumps(message.get("content"), sort_keys=True))
    raw = f"{first.get('system', '')}\x00{first.get('user', '')}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _tool_calls(response: dict[str, Any], index: int) -> list[dict[str, Any]]:
    calls = []
    for n, call in enumerate(response.get("tool_calls") or []):
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(
            {
                "id": call.get("id") or f"call_{index}_{n}",
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
    return calls


def _usage(response: dict[str, Any], messages: list[Any], content: str, calls: list[dict]) -> dict:
    given = response.get("usage") or {}
    reply_chars = len(content) + sum(len(c["function"]["arguments"]) for c in calls)
    prompt = given.get("prompt_tokens", _text_chars(messages) // 4)
    completion = given.get("completion_tokens", reply_chars // 4 + 1)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": given.get("cached_tokens", 0)},
    }


# --- The server ------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # benchmarks open a hundred conversations at once
    fake: FakeLLM

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is routine here (fault delays provoke it).
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's delayed
    # ACK of the headers (~40 ms on Linux) on every kept-alive request after the first.
    disable_nagle_algorithm = True
    server_version = "DeputiesScriptedLLM/1"
    timeout = 120  # idle keep-alive connections do not pin a thread forever
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            sys.stderr.write(f"fake-llm: {self.address_string()} {format % args}\n")

    # -- plumbing --
    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers=None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _error(self, status: int, message: str, type_: str = "invalid_request_error", headers=None) -> None:
        self._json(status, {"error": {"message": message, "type": type_, "code": None}}, headers)

    # -- routes --
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        fake = self.server.fake
        if path == "/healthz":
            self._json(200, {"ok": True, "scripted": True, "responses": len(fake.responses)})
        elif path in ("/v1/models", "/models"):
            model = {"id": "scripted", "object": "model", "created": 0, "owned_by": "deputies-scripted"}
            self._json(200, {"object": "list", "data": [model]})
        elif path == "/_requests":
            self._json(200, fake.requests)
        else:
            self._error(404, f"no route for GET {path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route for POST {path}")
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        fake = self.server.fake
        fake._record(self, path, body if body is not None else raw.decode("utf-8", "replace"))
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._error(400, 'the request body must be a JSON object with a "messages" list')
            return
        self._complete(body)

    def _complete(self, body: dict[str, Any]) -> None:
        fake = self.server.fake
        if fake.on_request is not None:
            fake.on_request(body)
        messages = body["messages"]
        index = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        key = conversation_key(messages)
        response = fake.responses[index] if index < len(fake.responses) else {"content": EXHAUSTED_TEXT}
        fault = fake._next_fault(key, index, response.get("faults") or [])
        if fault is not None:
            self._serve_fault(fault)
            return
        if response.get("delay"):
            time.sleep(float(response["delay"]))
        content = response.get("content") or ""
        calls = _tool_calls(response, index)
        usage = _usage(response, messages, content, calls)
        model = body.get("model") or "scripted"
        completion_id = f"chatcmpl-scripted-{key}-{index}"
        finish = "tool_calls" if calls else "stop"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(completion_id, model, content, calls, finish, usage if include_usage else None)
            return
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        self._json(
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "scripted",
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": usage,
            },
        )

    def _serve_fault(self, fault: dict[str, Any]) -> None:
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))
        if fault.get("disconnect"):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        headers = {}
        if fault.get("retry_after") is not None:
            headers["Retry-After"] = str(fault["retry_after"])
        if "body" in fault:
            self._send(
                int(fault.get("status", 200)), str(fault["body"]).encode(), "application/json", headers
            )
            return
        status = int(fault.get("status", 500))
        kind = "rate_limit_error" if status == 429 else "server_error"
        self._error(status, f"scripted fault (HTTP {status})", kind, headers)

    def _stream(self, cid: str, model: str, content: str, calls: list[dict], finish: str, usage) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        created = int(time.time())

        def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None, usage_=None) -> None:
            payload: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": []
                if delta is None
                else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            }
            if usage_ is not None:
                payload["usage"] = usage_
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        chunk({"role": "assistant", "content": ""})
        for piece in _pieces(content):
            chunk({"content": piece})
        for n, call in enumerate(calls):
            head = {"index": n, "id": call["id"], "type": "function"}
            chunk({"tool_calls": [{**head, "function": {"name": call["function"]["name"], "arguments": ""}}]})
            for piece in _pieces(call["function"]["arguments"]):
                chunk({"tool_calls": [{"index": n, "function": {"arguments": piece}}]})
        chunk({}, finish)
        if usage is not None:
            chunk(None, usage_=usage)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _pieces(text: str, size: int = 16) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


class FakeLLM:
    """A running scripted server. ``base_url`` ends in ``/v1`` like an OpenAI base URL."""

    def __init__(self, script: dict[str, Any], host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.responses = validate_script(script)
        self.verbose = verbose
        # Called with each chat request body (on the server thread) before it is answered: lets a
        # test act at an exact point of a conversation, e.g. cancel a run while "the model thinks".
        self.on_request: Callable[[dict[str, Any]], None] | None = None
        self._lock = threading.Lock()
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED_REQUESTS)
        self._attempts: dict[tuple[str, int], int] = {}
        self._server = _Server((host, port), _Handler)
        self._server.fake = self
        self._thread: threading.Thread | None = None
        self.host, self.port = self._server.server_address[:2]

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Recorded chat requests, oldest first: {path, headers, body, received_at}."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, handler: _Handler, path: str, body: Any) -> None:
        headers = {
            name.lower(): "[redacted]" if name.lower() in _SENSITIVE_HEADERS else value
            for name, value in handler.headers.items()
        }
        entry = {"path": path, "headers": headers, "body": body, "received_at": time.time()}
        with self._lock:
            self._requests.append(entry)

    def _next_fault(self, key: str, index: int, faults: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not faults:
            return None  # only responses with faults need counting; keeps a long demo's memory flat
        with self._lock:
            attempt = self._attempts.get((key, index), 0)
            self._attempts[(key, index)] = attempt + 1
        return faults[attempt] if attempt < len(faults) else None

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.05)

    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self.serve_forever, name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakeLLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_in_thread(script: dict[str, Any], host: str = "127.0.0.1", port: int = 0) -> FakeLLM:
    """Start serving ``script`` on a daemon thread; ``port=0`` picks a free port."""
    return FakeLLM(script, host, port).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deputies fake-llm",
        description="Serve a scripted OpenAI-compatible chat API (replays a script; not a real model).",
    )
    parser.add_argument("--script", required=True, metavar="FILE", help="JSON script of responses")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse already printed why
        return int(exc.code or 0)
    try:
        script = load_script(args.script)
    except ScriptError as exc:
        print(f"fake-llm: bad script: {exc}", file=sys.stderr)
        return 2
    try:
        fake = FakeLLM(script, args.host, args.port, verbose=args.verbose)
    except OSError as exc:
        print(f"fake-llm: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(
        f"SCRIPTED model (replays {args.script}, {len(fake.responses)} responses; not a real LLM) "
        f"at {fake.base_url} - Ctrl-C to stop",
        flush=True,
    )
    try:
        fake.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fake._server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

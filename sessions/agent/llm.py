"""Model clients: OpenAI-compatible Chat Completions and Anthropic Messages, over httpcore (httpx's pool).

The one boundary to model providers. Everything else speaks the *canonical* message format, which is
the OpenAI chat format: ``system`` / ``user`` / ``assistant`` (optionally with ``tool_calls``) /
``tool`` (with ``tool_call_id``) messages. The Anthropic client converts both ways.

Every call sends ``max_tokens``, has a timeout, and retries 429 (honouring ``Retry-After``), 5xx,
connection errors, timeouts and malformed bodies with exponential backoff plus jitter. Other 4xx
fail at once. ``on_attempt`` sees every HTTP attempt so callers can keep one row per call. A small
per-provider circuit breaker fails fast after repeated failed calls, so a provider outage does not
hold a hundred runs in backoff at once.

Usage is normalised so that ``input_tokens`` counts *all* prompt tokens, cached ones included (the
OpenAI convention; for Anthropic it is ``input_tokens + cache_read_input_tokens +
cache_creation_input_tokens``), and ``cached_tokens`` is the part served from the prompt cache.

API keys never appear in exceptions, attempt records or logs: error texts are scrubbed of the key.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpcore
import httpx
from django.conf import settings

logger = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
RETRY_AFTER_CAP = 60.0  # seconds; a provider asking for longer gets retried sooner, or fails
BACKOFF_CAP = 30.0
BODY_EXCERPT = 300
# Circuit breaker defaults; optional settings LLM_BREAKER_THRESHOLD / LLM_BREAKER_COOLDOWN override.
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN = 30.0


class LLMError(Exception):
    """A model call failed for good. The message is safe to show (no keys)."""

    def __init__(self, message: str, status_code: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status_code = status_code
        self.retryable = retryable


class LLMConfigError(LLMError):
    """The model string or provider configuration is unusable."""


class CircuitOpen(LLMError):
    """The provider failed repeatedly; calls fail fast until the cool-down ends."""


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str  # "openai" or "anthropic"
    base_url: str
    api_key: str = field(default="", repr=False)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw JSON string as the model produced it (may be invalid JSON)


@dataclass
class Usage:
    input_tokens: int = 0  # all prompt tokens, cached included
    output_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class LLMResponse:
    text: str
    tool_calls: list[ToolCall]
    usage: Usage
    finish_reason: str  # "stop", "tool_calls", "length", ... (Anthropic stop reasons are mapped)
    latency_ms: int
    status_code: int

    def to_message(self) -> dict[str, Any]:
        """The canonical assistant message to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        elif message["content"] is None:
            message["content"] = ""
        return message


@dataclass
class AttemptRecord:
    provider: str
    model: str
    attempt: int  # 1-based
    outcome: str  # "ok", "retry" or "error" (the LLMCall.Outcome values)
    status_code: int | None
    latency_ms: int
    usage: Usage | None = None
    error: str = ""

    @property
    def model_key(self) -> str:
        return f"{self.provider}/{self.model}"


OnAttempt = Callable[[AttemptRecord], None]


# --- Configuration ---------------------------------------------------------------------------


def resolve_model(model_key: str) -> tuple[ProviderConfig, str]:
    """``"provider/model"`` -> (provider config, model name). The model part may contain slashes."""
    providers: dict[str, dict[str, str]] = settings.LLM_PROVIDERS
    configured = ", ".join(sorted(providers)) or "none"
    provider, sep, model = (model_key or "").partition("/")
    if not sep or not provider or not model:
        raise LLMConfigError(
            f"model {model_key!r} must look like provider/model (configured providers: {configured})"
        )
    conf = providers.get(provider)
    if conf is None:
        raise LLMConfigError(
            f"unknown LLM provider {provider!r} in {model_key!r} (configured providers: {configured})"
        )
    kind = conf.get("kind", "openai")
    if kind not in ("openai", "anthropic"):
        raise LLMConfigError(f"LLM provider {provider!r} has unknown kind {kind!r} (openai or anthropic)")
    if not conf.get("base_url"):
        raise LLMConfigError(f"LLM provider {provider!r} has no base_url")
    return ProviderConfig(provider, kind, conf["base_url"].rstrip("/"), conf.get("api_key") or ""), model


class _Pool(httpcore.ConnectionPool):
    """httpcore's pool, less a race that hangs a model call for its whole read timeout.

    A pass over the pool (any thread's request starting or ending) assigns idle connections to
    requests, but a connection stays idle until the thread it was given to starts its request on
    it. Another thread's pass meanwhile may close it: its keep-alive just expired, or it counts as
    a surplus idle connection (encode/httpcore#1110). Closed after that request was sent, the socket
    goes away under a thread waiting in poll() for the answer, which the close does not wake; the
    pass's own new connection usually gets the same descriptor number, so the waiting thread then
    watches someone else's socket until its read timeout. Here a pass does not see connections
    that are promised to a request that has not started on them yet: it neither closes them nor
    hands them to a second request."""

    def _assign_requests_to_connections(self) -> list:
        promised = {id(r.connection) for r in self._requests if r.connection is not None}
        held = [c for c in self._connections if id(c) in promised and c.is_idle()]
        if not held:
            return super()._assign_requests_to_connections()
        self._connections = [c for c in self._connections if not any(c is h for h in held)]
        try:
            return super()._assign_requests_to_connections()
        finally:
            self._connections = held + self._connections


def new_pool() -> _Pool:
    """The connection pool ``httpx.HTTPTransport`` would build (its TLS context, keep-alive expiry of
    5 s), with no cap on connections or idle ones, and Nagle's algorithm off: httpcore writes a
    request's headers and its body separately, and the body would wait for the server's (delayed)
    ACK of the headers, up to 40 ms."""
    return _Pool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=None,
        max_keepalive_connections=None,
        keepalive_expiry=5.0,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


_shared_pools: dict[str, _Pool] = {}
_shared_pools_lock = threading.Lock()


def shared_pool(base_url: str) -> _Pool:
    """One connection pool per provider and process: keeps connections warm between runs and skips
    building an SSL context (tens of ms) for every run. Thread-safe; timeouts are per request.

    No cap on idle connections, and the pool's race fixed (``_Pool``): with hundreds of runs per
    process it hung about one model call in a thousand for 120 s."""
    with _shared_pools_lock:
        pool = _shared_pools.get(base_url)
        if pool is None:
            pool = _shared_pools[base_url] = new_pool()
        return pool


def client_for(model_key: str, **kwargs: Any) -> LLMClient:
    """The right client for ``"provider/model"``; close it (or use ``with``) when done."""
    provider, model = resolve_model(model_key)
    cls = AnthropicClient if provider.kind == "anthropic" else OpenAIClient
    return cls(provider, model, **kwargs)


_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def _price(model_key: str) -> dict[str, Any] | None:
    prices: dict[str, dict[str, Any]] = settings.LLM_PRICES
    bare = model_key.split("/", 1)[1] if "/" in model_key else model_key
    for key in (model_key, bare, _DATE_SUFFIX.sub("", bare)):
        if key in prices:
            return prices[key]
    return None


def cost_usd(model_key: str, usage: Usage) -> Decimal:
    """USD for one call, from settings.LLM_PRICES (USD per million tokens).

    Looked up as "provider/model", then the bare model, then the bare model without a date suffix
    ("claude-sonnet-4-5-20250929" -> "claude-sonnet-4-5"); unknown models cost 0. ``input_tokens``
    includes the cached ones, so cached tokens are billed at the ``cached`` rate (the input rate when
    no cached rate is given) and the rest of the input at the ``input`` rate. Six decimal places.
    """
    price = _price(model_key)
    if not price:
        return Decimal("0")
    input_rate = Decimal(str(price.get("input", 0)))
    cached_rate = Decimal(str(price.get("cached", price.get("input", 0))))
    output_rate = Decimal(str(price.get("output", 0)))
    cached = min(usage.cached_tokens, usage.input_tokens)
    total = (
        (usage.input_tokens - cached) * input_rate + cached * cached_rate + usage.output_tokens * output_rate
    ) / Decimal(1_000_000)
    return total.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


# --- Circuit breaker ---------------------------------------------------------------------------


class _Breaker:
    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0


_breakers: dict[tuple[str, str], _Breaker] = {}
_breakers_lock = threading.Lock()


def reset_breakers() -> None:
    with _breakers_lock:
        _breakers.clear()


def _breaker_settings() -> tuple[int, float]:
    return (
        int(getattr(settings, "LLM_BREAKER_THRESHOLD", BREAKER_THRESHOLD)),
        float(getattr(settings, "LLM_BREAKER_COOLDOWN", BREAKER_COOLDOWN)),
    )


# --- Clients -----------------------------------------------------------------------------------


class _Malformed(Exception):
    pass


class LLMClient:
    """One model on one provider. Thread-safe enough for sequential use per run; not shared.

    Requests go straight to httpcore's connection pool (the one ``httpx.Client`` sits on): the
    client's own layers (URL merging, cookies, auth and redirect flows, header merging, response
    wrapping) cost about as much CPU per call as the pool and HTTP/1.1 themselves and do nothing
    here. The URL and headers are built once per process (``_wire``), the JSON of the conversation
    once per message (``OpenAIClient``). httpcore's exceptions are the ones httpx maps to its own
    of the same names, so errors read as they did through httpx. No cookies are kept between calls
    and no redirect is followed (httpx.Client followed none either)."""

    def __init__(
        self,
        provider: ProviderConfig,
        model: str,
        *,
        max_tokens: int | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_base_delay: float | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.max_tokens = max_tokens if max_tokens is not None else settings.LLM_MAX_TOKENS
        self.timeout = timeout if timeout is not None else settings.LLM_TIMEOUT
        self.max_retries = max_retries if max_retries is not None else settings.LLM_MAX_RETRIES
        self.retry_base_delay = (
            retry_base_delay if retry_base_delay is not None else settings.LLM_RETRY_BASE_DELAY
        )
        self._pool = shared_pool(provider.base_url)
        t = self.timeout
        self._extensions = {"timeout": {"connect": t, "read": t, "write": t, "pool": t}}

    @property
    def model_key(self) -> str:
        return f"{self.provider.name}/{self.model}"

    def close(self) -> None:
        """Nothing to give back: connections belong to the process's pool (``shared_pool``)."""

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Subclasses: where to send, their own headers, the body and the response parsing.
    def _url(self) -> str:
        raise NotImplementedError

    def _headers(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _body(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bytes:
        raise NotImplementedError

    def _parse(self, body: Any) -> tuple[str, list[ToolCall], Usage, str]:
        raise NotImplementedError

    def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        on_attempt: OnAttempt | None = None,
    ) -> LLMResponse:
        """One model turn, retried as needed. ``tools`` are OpenAI-style function specs
        ``[{name, description, parameters}]``. Raises LLMError when it gives up.

        Messages sent by an earlier call of this client must not be changed in place (replace
        them, as compaction does): their JSON is reused."""
        body = self._body(messages, tools)
        length = (b"Content-Length", b"%d" % len(body))
        threshold, cooldown = _breaker_settings()
        with _breakers_lock:
            breaker = _breakers.setdefault((self.provider.name, self.provider.base_url), _Breaker())
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            wait = breaker.open_until - time.monotonic()
            if wait > 0:
                message = (
                    f"{self.provider.name}: circuit open after {breaker.failures} failed calls; "
                    f"not calling for another {wait:.0f}s"
                )
                self._report(on_attempt, attempt, "error", None, 0, None, message)
                raise CircuitOpen(message, retryable=False)
            started = time.monotonic()
            status: int | None = None
            retry_after: float | None = None
            try:
                url, headers = _wire(self._url(), tuple(self._headers()))
                request = httpcore.Request(
                    b"POST", url, headers=[*headers, length], content=body, extensions=self._extensions
                )
                response = self._pool.handle_request(request)
                try:
                    content = response.read()
                finally:
                    response.close()
                status = response.status
                latency = _ms(started)
                if 200 <= status < 300:
                    try:
                        text, calls, usage, finish = self._parse(json.loads(content))
                    except (ValueError, TypeError, AttributeError, KeyError, _Malformed) as exc:
                        raise _Retryable(
                            f"malformed response body ({exc}): {_excerpt(_text(content))}"
                        ) from None
                    self._report(on_attempt, attempt, "ok", status, latency, usage, "")
                    with _breakers_lock:
                        breaker.failures = 0
                        breaker.open_until = 0.0
                    return LLMResponse(text, calls, usage, finish, latency, status)
                error = f"HTTP {status}: {_excerpt(_text(content))}"
                if status == 429 or status >= 500:
                    retry_after = _retry_after(response.headers) if status in (429, 503) else None
                    raise _Retryable(error)
                # Other 4xx: our request is wrong or unauthorised; retrying will not help.
                error = self._scrub(f"{self.provider.name} rejected the request: {error}")
                self._report(on_attempt, attempt, "error", status, latency, None, error)
                raise LLMError(error, status_code=status)
            except (httpx.InvalidURL, httpcore.UnsupportedProtocol) as exc:
                error = self._scrub(f"{self.provider.name}: the base URL is not usable: {exc}")
                self._report(on_attempt, attempt, "error", None, _ms(started), None, error)
                raise LLMConfigError(error) from None
            except (_Retryable, *TRANSPORT_ERRORS) as exc:
                latency = _ms(started)
                if isinstance(exc, httpcore.TimeoutException):
                    error = f"timed out after {self.timeout:g}s ({type(exc).__name__})"
                elif isinstance(exc, _Retryable):
                    error = str(exc)
                else:
                    error = f"connection error: {type(exc).__name__}: {exc}"
                error = self._scrub(error)
                if attempt < attempts:
                    self._report(on_attempt, attempt, "retry", status, latency, None, error)
                    time.sleep(retry_after if retry_after is not None else self._backoff(attempt))
                    continue
                self._report(on_attempt, attempt, "error", status, latency, None, error)
                with _breakers_lock:
                    breaker.failures += 1
                    if breaker.failures >= threshold:
                        breaker.open_until = time.monotonic() + cooldown
                raise LLMError(
                    f"{self.provider.name}/{self.model} failed after {attempt} attempts: {error}",
                    status_code=status,
                    retryable=True,
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        delay = min(self.retry_base_delay * (2 ** (attempt - 1)), BACKOFF_CAP)
        return delay * (1 + random.uniform(0, 0.25))

    def _report(
        self,
        on_attempt: OnAttempt | None,
        attempt: int,
        outcome: str,
        status: int | None,
        latency: int,
        usage: Usage | None,
        error: str,
    ) -> None:
        if outcome != "ok":
            logger.warning("LLM %s attempt %d: %s: %s", self.model_key, attempt, outcome, error)
        if on_attempt is not None:
            on_attempt(
                AttemptRecord(self.provider.name, self.model, attempt, outcome, status, latency, usage, error)
            )

    def _scrub(self, text: str) -> str:
        key = self.provider.api_key
        if key and len(key) >= 4:
            text = text.replace(key, "[redacted]")
        return text


class _Retryable(Exception):
    pass


USER_AGENT = f"python-httpx/{httpx.__version__}".encode()
# httpcore's errors a call can meet on the way (httpx maps these to its TransportError family);
# httpcore.UnsupportedProtocol is the base URL's fault, not the connection's.
TRANSPORT_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
)
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@functools.lru_cache(maxsize=64)
def _wire(
    url: str, extra: tuple[tuple[str, str], ...]
) -> tuple[httpcore.URL, tuple[tuple[bytes, bytes], ...]]:
    """The URL and headers of every request to ``url``: httpx's, less cookies and the two that only
    say what HTTP/1.1 assumes anyway (``Accept: */*``, ``Connection: keep-alive``), with
    ``identity`` as the only content coding (nothing to decompress); then ``extra``. Parsed once
    per process, not once per run."""
    parsed = httpx.URL(url)  # httpx.InvalidURL for an unusable base URL
    headers = (
        (b"Host", parsed.netloc),
        (b"Accept-Encoding", b"identity"),
        (b"User-Agent", USER_AGENT),
        (b"Content-Type", b"application/json"),
        *((name.encode("ascii"), value.encode("ascii")) for name, value in extra),
    )
    target = httpcore.URL(
        scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path
    )
    return target, headers


def _json(value: Any) -> bytes:
    """JSON as httpx's ``json=`` sent it."""
    return _encoder.encode(value).encode()


def _text(content: bytes) -> str:
    return content.decode("utf-8", "replace")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _excerpt(text: str) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= BODY_EXCERPT else text[:BODY_EXCERPT] + "..."


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), capped."""
    named = {name.lower(): value.decode("latin-1") for name, value in headers}
    value: float | None = None
    try:
        if named.get(b"retry-after-ms"):
            value = float(named[b"retry-after-ms"]) / 1000
        elif named.get(b"retry-after"):
            raw = named[b"retry-after"].strip()
            try:
                value = float(raw)
            except ValueError:
                when = email.utils.parsedate_to_datetime(raw)
                value = when.timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return None
    if value is None:
        return None
    return min(max(value, 0.0), RETRY_AFTER_CAP)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class OpenAIClient(LLMClient):
    """Chat Completions: OpenAI, vLLM, Ollama, LiteLLM and the scripted server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The conversation as last sent: its messages (the objects), and their JSON with where each
        # one's ends. A step adds messages at the end, so only those are encoded; a message that is
        # not the one sent at its place (compaction replaced it) is encoded again, with all after it.
        self._sent: list[dict[str, Any]] = []
        self._ends: list[int] = []
        self._encoded = bytearray()
        self._tools: tuple[list[dict[str, Any]] | None, int, bytes] = (None, 0, b"")

    def _url(self):
        return f"{self.provider.base_url}/chat/completions"

    def _headers(self):
        return [("Authorization", f"Bearer {self.provider.api_key}")] if self.provider.api_key else []

    def _body(self, messages, tools):
        """``{"model", "messages", "max_tokens", "tools"}`` as JSON, the messages from the last
        call's JSON where they are the same objects."""
        sent, ends, encoded = self._sent, self._ends, self._encoded
        kept = len(sent)
        if messages[:kept] != sent:  # shorter, or a message replaced (compared by identity first)
            same = min(kept, len(messages))
            kept = next((n for n, (a, b) in enumerate(zip(sent, messages, strict=False)) if a is not b), same)
            del sent[kept:]
            del ends[kept:]
            del encoded[ends[-1] if ends else 0 :]
        for message in messages[kept:]:
            if ends:
                encoded += b","
            encoded += _json(message)
            sent.append(message)
            ends.append(len(encoded))
        head = b'{"model":%s,"messages":[' % _json(self.model)
        tail = b'],"max_tokens":%d' % self.max_tokens
        if not tools:
            return b"".join((head, encoded, tail, b"}"))
        if self._tools[0] is not tools or self._tools[1] != len(tools):
            self._tools = (
                tools,
                len(tools),
                _json([{"type": "function", "function": spec} for spec in tools]),
            )
        return b"".join((head, encoded, tail, b',"tools":', self._tools[2], b"}"))

    def _parse(self, body):
        if not isinstance(body, dict) or not body.get("choices"):
            raise _Malformed(f"no choices in {_excerpt(json.dumps(body))}")
        choice = body["choices"][0]
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise _Malformed("choices[0].message missing")
        content = message.get("content")
        if isinstance(content, list):  # some servers send content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        calls = []
        for n, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") or {}
            if not function.get("name"):
                raise _Malformed(f"tool_calls[{n}] has no function name")
            arguments = function.get("arguments")
            if not isinstance(arguments, str):  # some servers send an object
                arguments = json.dumps(arguments if arguments is not None else {})
            calls.append(ToolCall(call.get("id") or f"call_{n}", function["name"], arguments))
        raw_usage = body.get("usage") or {}
        details = raw_usage.get("prompt_tokens_details") or {}
        usage = Usage(
            _int(raw_usage.get("prompt_tokens")),
            _int(raw_usage.get("completion_tokens")),
            _int(details.get("cached_tokens")),
        )
        finish = choice.get("finish_reason") or ("tool_calls" if calls else "stop")
        return content or "", calls, usage, finish


class AnthropicClient(LLMClient):
    """Anthropic Messages API; converts the canonical (OpenAI-format) conversation."""

    STOP_REASONS = {
        "end_turn": "stop",
        "tool_use": "tool_calls",
        "max_tokens": "length",
        "stop_sequence": "stop",
    }

    def _url(self):
        base = self.provider.base_url
        return f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"

    def _headers(self):
        return [("x-api-key", self.provider.api_key), ("anthropic-version", ANTHROPIC_VERSION)]

    def _body(self, messages, tools):
        system, converted = to_anthropic_messages(messages)
        payload: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "messages": converted}
        if system:
            payload["system"] = system
        if tools:
            payload["tools"] = [
                {
                    "name": spec["name"],
                    "description": spec.get("description", ""),
                    "input_schema": spec.get("parameters") or {"type": "object", "properties": {}},
                }
                for spec in tools
            ]
        return _json(payload)

    def _parse(self, body):
        if not isinstance(body, dict) or not isinstance(body.get("content"), list):
            raise _Malformed(f"no content in {_excerpt(json.dumps(body))}")
        texts, calls = [], []
        for block in body["content"]:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                texts.append(block.get("text") or "")
            elif block.get("type") == "tool_use":
                calls.append(
                    ToolCall(
                        block.get("id") or "", block.get("name") or "", json.dumps(block.get("input") or {})
                    )
                )
        raw = body.get("usage") or {}
        cache_read = _int(raw.get("cache_read_input_tokens"))
        usage = Usage(
            _int(raw.get("input_tokens")) + cache_read + _int(raw.get("cache_creation_input_tokens")),
            _int(raw.get("output_tokens")),
            cache_read,
        )
        stop = body.get("stop_reason") or ""
        finish = self.STOP_REASONS.get(stop, stop or ("tool_calls" if calls else "stop"))
        return "".join(texts), calls, usage, finish


def to_anthropic_messages(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Canonical -> (system, Anthropic messages).

    System messages are joined into ``system``; tool results become ``tool_result`` blocks in a user
    turn; consecutive turns of the same role are merged because Anthropic requires alternation.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for message in messages:
        role = message.get("role")
        content = message.get("content")
        text = _plain_text(content)
        if role == "system":
            if text:
                system.append(text)
        elif role == "user":
            add("user", [{"type": "text", "text": text}] if text else [])
        elif role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    arguments = {"_unparsed_arguments": function.get("arguments")}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "input": arguments,
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            add(
                "user", [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"), "content": text}]
            )
    return "\n\n".join(system), turns


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""

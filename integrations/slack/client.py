"""The one boundary to Slack: slack-sdk's ``WebClient`` (and its Socket Mode client) built from the
settings. ``DEPUTIES_SLACK_API_URL`` moves the whole Web API (tests: a loopback fake); the library's
own retry handlers are off, because retries are the deliveries' job (attempt log, back-off,
``Retry-After``), and a retry hidden inside one attempt would hold a delivery thread for minutes.
slack-sdk is imported on the first call: a deployment without Slack never loads it (~1.3 MB a process).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from slack_sdk import WebClient

_clients: dict[tuple, WebClient] = {}
_lock = threading.Lock()


def web_client(token: str | None = None, timeout: float | None = None) -> WebClient:
    base = settings.SLACK_API_URL if settings.SLACK_API_URL.endswith("/") else settings.SLACK_API_URL + "/"
    key = (token if token is not None else settings.SLACK_BOT_TOKEN, base, timeout or settings.SLACK_TIMEOUT)
    with _lock:
        client = _clients.get(key)
        if client is None:
            from slack_sdk import WebClient

            client = WebClient(
                token=key[0] or None, base_url=base, timeout=int(max(1, key[2])), retry_handlers=[]
            )
            _clients[key] = client
        return client


@dataclass
class Result:
    """One Web API call: ``ok``, Slack's ``error`` code, the HTTP status, what a 429 asked for."""

    ok: bool
    data: dict
    status_code: int | None = None
    error: str = ""
    retry_after: float | None = None
    transport_error: bool = False


def call(method: str, *, timeout: float | None = None, **params) -> Result:
    """``method`` (e.g. ``chat.postMessage``) with JSON ``params``; never raises for Slack's answer."""
    from slack_sdk.errors import SlackApiError

    client = web_client(timeout=timeout)
    try:
        response = client.api_call(method, json=params)
    except SlackApiError as exc:
        response = exc.response
        retry_after = None
        raw = response.headers.get("Retry-After") or response.headers.get("retry-after")
        if isinstance(raw, list):
            raw = raw[0] if raw else None
        if raw:
            try:
                retry_after = float(raw)
            except ValueError:
                retry_after = None
        data = response.data if isinstance(response.data, dict) else {}
        return Result(
            ok=False,
            data=data,
            status_code=response.status_code,
            error=str(data.get("error") or f"HTTP {response.status_code}"),
            retry_after=retry_after,
        )
    except (OSError, ValueError) as exc:  # refused, timed out, reset; a body that is not JSON (a 5xx page)
        return Result(ok=False, data={}, error=f"{type(exc).__name__}: {exc}", transport_error=True)
    return Result(ok=True, data=dict(response.data), status_code=response.status_code)

"""Senders: how one attempt of a delivery reaches its kind of receiver.

The pipeline (claim, attempt log, back-off, events, recovery) is ``services``; a sender only makes
one attempt and says what happened in an ``Outcome``. A new kind (Slack, GitHub) is one class::

    @register
    class SlackSender(Sender):
        kind = "slack"
        def send(self, delivery, attempt): ...

imported by its app's ``ready()``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

import httpx
from django.conf import settings

from deputies.netguard import UnsafeAddress, guarded_client
from integrations.deliveries.models import display_url

log = logging.getLogger(__name__)

EXCERPT_CHARS = 1000
# 4xx answers that mean "later", not "never" (RFC 9110 408, 409; 425 Too Early; 429 Too Many Requests).
RETRYABLE_4XX = (408, 409, 425, 429)
SIGNATURE_HEADER = "X-Deputies-Signature"
DELIVERY_HEADER = "X-Deputies-Delivery"
IDEMPOTENCY_HEADER = "X-Deputies-Idempotency-Key"


@dataclass
class Outcome:
    """One attempt's result. ``retry`` False with ``ok`` False ends the delivery failed."""

    ok: bool
    retry: bool = False
    status_code: int | None = None
    excerpt: str = ""
    error: str = ""
    retry_after: float | None = None  # seconds the receiver asked us to wait


class Sender:
    kind: str = ""

    def send(self, delivery, attempt: int) -> Outcome:
        raise NotImplementedError


_registry: dict[str, type[Sender]] = {}


def register(cls: type[Sender]) -> type[Sender]:
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    _registry[cls.kind] = cls
    return cls


def sender_for(kind: str) -> Sender:
    try:
        return _registry[kind]()
    except KeyError:
        raise LookupError(f"no sender for deliveries of kind {kind!r}") from None


def kinds() -> list[str]:
    return sorted(_registry)


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Deputies-Signature`` value: ``t=<unix>,v1=<hex HMAC-SHA256 of "t.body">``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def body_of(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


_clients: dict[tuple, httpx.Client] = {}
_clients_lock = threading.Lock()


def http_client() -> httpx.Client:
    """One guarded client per process (and allow list): connections to a receiver are reused."""
    key = (tuple(settings.CALLBACK_ALLOWED_NETWORKS), settings.DELIVERY_TIMEOUT)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = guarded_client(
                settings.CALLBACK_ALLOWED_NETWORKS,
                "DEPUTIES_CALLBACK_ALLOWED_NETWORKS",
                timeout=settings.DELIVERY_TIMEOUT,
                headers={"User-Agent": "Deputies-Callback/1"},
            )
            _clients[key] = client
        return client


def read_excerpt(response: httpx.Response) -> str:
    data = b""
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= EXCERPT_CHARS * 4:
            break
    return data.decode("utf-8", "replace")[:EXCERPT_CHARS]


@register
class HttpSender(Sender):
    """POST the payload as JSON, signed with the subscription's secret; no redirects followed."""

    kind = "http"

    def send(self, delivery, attempt: int) -> Outcome:
        subscription = delivery.subscription
        if subscription is None:
            return Outcome(ok=False, error="the callback subscription was removed; nothing to sign with")
        body = body_of(delivery.payload)
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: str(delivery.pk),
            IDEMPOTENCY_HEADER: delivery.idempotency_key,
            "X-Deputies-Event": delivery.event,
            "X-Deputies-Attempt": str(attempt),
            SIGNATURE_HEADER: sign(subscription.secret(), body),
        }
        try:
            with http_client().stream("POST", delivery.target, content=body, headers=headers) as response:
                excerpt = read_excerpt(response)
                code = response.status_code
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                location = response.headers.get("Location", "")
        except UnsafeAddress as exc:
            return Outcome(ok=False, error=f"refused: {exc}")
        except httpx.InvalidURL as exc:
            return Outcome(ok=False, error=f"not a valid URL: {exc}")
        except httpx.TransportError as exc:  # refused, reset, dropped, timed out: try again later
            return Outcome(
                ok=False, retry=True, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            )
        if 200 <= code < 300:
            return Outcome(ok=True, status_code=code, excerpt=excerpt)
        if 300 <= code < 400:
            return Outcome(
                ok=False,
                status_code=code,
                excerpt=excerpt,
                error=f"the receiver answered {code} (to {display_url(location) if location else 'nowhere'}); "
                "redirects are not followed",
            )
        retry = code >= 500 or code in RETRYABLE_4XX
        return Outcome(
            ok=False,
            retry=retry,
            status_code=code,
            excerpt=excerpt,
            error=f"the receiver answered {code}",
            retry_after=retry_after,
        )

"""The one client module for GitHub: who we are (an app, or a personal access token) and a PyGithub
client for an installation.

Installation tokens last an hour; each process caches one per installation and asks for a new one
``REFRESH_MARGIN`` before it expires, so a clone, a push and the comment after a long run never meet
an expired token. PyGithub's own retries are off: a request is retried by whoever owns its
lifecycle (a delivery's back-off honours ``Retry-After``; a webhook answers an error and GitHub
shows it for redelivery), never by sleeping inside a worker thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from github import Github, GithubIntegration

REFRESH_MARGIN = 300.0  # seconds before expiry a cached installation token is replaced
TIMEOUT = 15


class NotConfigured(Exception):
    """Neither an app (id + private key) nor a personal access token is configured."""


def mode() -> str:
    """``app``, ``token`` (the personal-access-token fallback) or ``off``."""
    if settings.GITHUB_APP_ID and settings.GITHUB_PRIVATE_KEY:
        return "app"
    if settings.GITHUB_TOKEN:
        return "token"
    return "off"


@dataclass
class _Cached:
    token: str
    expires: float  # unix time


_tokens: dict[tuple[str, str, int], _Cached] = {}
_lock = threading.Lock()


def integration() -> GithubIntegration:
    from github import Auth, GithubIntegration

    auth = Auth.AppAuth(settings.GITHUB_APP_ID, settings.GITHUB_PRIVATE_KEY)
    return GithubIntegration(auth=auth, base_url=settings.GITHUB_API_URL, timeout=TIMEOUT, retry=None)


def installation_token(installation_id: int) -> str:
    """A token for the installation (the PAT in token mode), fresh for at least ``REFRESH_MARGIN``."""
    current = mode()
    if current == "token":
        return settings.GITHUB_TOKEN
    if current == "off":
        raise NotConfigured(
            "GitHub is not configured: set DEPUTIES_GITHUB_APP_ID and DEPUTIES_GITHUB_PRIVATE_KEY."
        )
    key = (settings.GITHUB_API_URL, settings.GITHUB_APP_ID, int(installation_id))
    with _lock:
        cached = _tokens.get(key)
        if cached is not None and cached.expires - REFRESH_MARGIN > time.time():
            return cached.token
    granted = integration().get_access_token(int(installation_id))
    expires = granted.expires_at
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    with _lock:
        _tokens[key] = _Cached(granted.token, expires.timestamp())
    return granted.token


def forget_token(installation_id: int) -> None:
    """Drop a cached token GitHub no longer accepts (revoked, or the app's key rotated)."""
    with _lock:
        for key in [k for k in _tokens if k[2] == int(installation_id)]:
            del _tokens[key]


def github_for(installation_id: int) -> Github:
    """A PyGithub client acting as the installation; lazy objects, no retries of its own.

    PyGithub is imported here, not at the top: every web and worker process loads this module
    (the app registers its sender), and PyGithub costs each ~13 MB."""
    from github import Auth, Github

    return Github(
        auth=Auth.Token(installation_token(installation_id)),
        base_url=settings.GITHUB_API_URL,
        timeout=TIMEOUT,
        retry=None,
        lazy=True,
        seconds_between_requests=None,
        seconds_between_writes=None,
    )

"""The connection to the container engine, its errors, and how this deployment marks what it owns."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import docker
import docker.errors
import requests
from django.conf import settings

from sandboxes.base import SandboxError

WORKSPACE = "/workspace"
SESSION_LABEL = "deputies.session"
DEPLOYMENT_LABEL = "deputies.deployment"
MANAGED_LABEL = "deputies.managed"
SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_clients: dict[tuple, docker.DockerClient] = {}
_clients_lock = threading.Lock()


def engine_address() -> str:
    return settings.DOCKER_HOST or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def engine_client() -> docker.DockerClient:
    """One client per process and engine address (worker processes fork; sockets must not be shared)."""
    key = (os.getpid(), settings.DOCKER_HOST, os.environ.get("DOCKER_HOST"), settings.DOCKER_API_TIMEOUT)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            options = {"timeout": settings.DOCKER_API_TIMEOUT, "max_pool_size": 32}
            try:
                if settings.DOCKER_HOST:
                    client = docker.DockerClient(base_url=settings.DOCKER_HOST, **options)
                else:
                    client = docker.from_env(**options)
            except docker.errors.DockerException as exc:
                raise SandboxError(
                    f"the container engine at {engine_address()} does not answer: {exc}"
                ) from exc
            _clients[key] = client
    return client


def explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return str(exc) or type(exc).__name__


@contextmanager
def engine_errors(what: str) -> Iterator[None]:
    """Engine and transport errors become SandboxError, prefixed with what was being done."""
    try:
        yield
    except SandboxError:
        raise
    except docker.errors.APIError as exc:
        raise SandboxError(f"{what}: {explain(exc)}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise SandboxError(f"{what}: the container engine at {engine_address()} failed: {exc}") from exc


def check_sandbox_id(sandbox_id: str) -> None:
    if not isinstance(sandbox_id, str) or not SANDBOX_ID.match(sandbox_id):
        raise SandboxError(f"invalid docker sandbox id {sandbox_id!r}")


def check_ours(kind: str, name: str, labels: dict | None) -> None:
    labels = labels or {}
    deployment = settings.DOCKER_DEPLOYMENT
    if labels.get(MANAGED_LABEL) != "true" or labels.get(DEPLOYMENT_LABEL) != deployment:
        raise SandboxError(
            f"{kind} {name} is not a sandbox of this deployment ({DEPLOYMENT_LABEL}={deployment}); "
            "refusing to touch it"
        )

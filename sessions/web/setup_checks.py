"""What the setup-status page checks. Each check says ok / warn / error / off and, when not ok, one fix.

Nothing secret is shown: LLM keys only as "set", URLs without credentials, errors as class names
where their message could carry hostnames or user names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

logger = logging.getLogger(__name__)

QUEUE_STALL = timedelta(seconds=60)  # a task waiting longer than this means no worker is taking tasks
HEARTBEAT_STALE = timedelta(minutes=5)


@dataclass
class Check:
    name: str
    status: str  # ok, warn, error, off
    summary: str
    fix: str = ""
    details: list[tuple[str, str]] = field(default_factory=list)


def safe_url(url: str) -> str:
    """The URL without user, password, query or fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_database() -> Check:
    from django.db.migrations.executor import MigrationExecutor

    vendor = connection.vendor
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            executor = MigrationExecutor(connection)
            pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception as exc:
        logger.warning("setup: database check failed", exc_info=True)
        return Check(
            "Database",
            "error",
            f"{vendor} does not answer ({type(exc).__name__}).",
            "Check DATABASE_URL and that the database server is running.",
        )
    details = [("Engine", vendor), ("Name", str(settings.DATABASES["default"]["NAME"]))]
    if pending:
        return Check(
            "Database",
            "error",
            f"{len(pending)} migration(s) not applied.",
            "Run `deputies up` or `python manage.py migrate`.",
            details,
        )
    if vendor == "sqlite":
        return Check("Database", "ok", "SQLite (Simple mode).", details=details)
    return Check("Database", "ok", f"{vendor} answers; migrations applied.", details=details)


def check_queue() -> Check:
    from django_q.models import Failure, OrmQ, Success

    from sessions.models import Run, WorkerProcess

    now = timezone.now()
    waiting = OrmQ.objects.filter(lock__lte=now)
    oldest = waiting.order_by("lock").values_list("lock", flat=True).first()
    last_success = Success.objects.order_by("-stopped").values_list("stopped", flat=True).first()
    last_failure = Failure.objects.order_by("-stopped").values_list("stopped", flat=True).first()
    running = Run.objects.filter(status=Run.Status.RUNNING)
    fresh = running.filter(heartbeat__gte=now - HEARTBEAT_STALE).count()
    stale = running.filter(heartbeat__lt=now - HEARTBEAT_STALE).count()
    workers = list(WorkerProcess.alive())
    details = [
        ("Tasks waiting", str(waiting.count())),
        ("Tasks being worked on", str(OrmQ.objects.filter(lock__gt=now).count())),
        ("Runs with a live heartbeat", str(fresh)),
        ("Workers alive", str(len(workers)) if workers else "none seen in the last minute"),
    ]
    details += [
        (
            f"Worker {w.name}",
            f"seen {_ago(w.last_seen, now)}, {w.running} of {w.slots} run slots busy, up since {_ago(w.started, now)}",
        )
        for w in workers
    ]
    details += [
        ("Last task succeeded", _ago(last_success, now)),
        ("Last task failed", _ago(last_failure, now)),
    ]
    start_one = "Start a worker: `deputies worker` (or `deputies up`, which runs one with the web server)."
    if oldest is not None and now - oldest > QUEUE_STALL:
        return Check(
            "Queue workers",
            "error",
            f"A task has waited {_seconds(now - oldest)} for a worker.",
            start_one,
            details,
        )
    if stale:
        return Check(
            "Queue workers",
            "warn",
            f"{stale} running run(s) have not sent a heartbeat for {int(HEARTBEAT_STALE.total_seconds() // 60)} minutes.",
            "A worker may have died mid-run: check the worker logs, then cancel or retry those sessions.",
            details,
        )
    if workers:
        slots = sum(w.slots for w in workers)
        return Check(
            "Queue workers", "ok", f"{len(workers)} worker(s) alive with {slots} run slots.", details=details
        )
    return Check("Queue workers", "warn", "No worker has reported in the last minute.", start_one, details)


def check_sandbox() -> Check:
    from sandboxes.base import get_provider

    try:
        provider = get_provider()
        health = provider.health()
        caps = provider.capabilities()
    except Exception as exc:
        logger.warning("setup: sandbox provider check failed", exc_info=True)
        return Check(
            "Sandbox provider",
            "error",
            f"{settings.SANDBOX_PROVIDER}: {type(exc).__name__}: {str(exc)[:200]}",
            "Check DEPUTIES_SANDBOX_PROVIDER and that the provider (e.g. Docker) is reachable from the worker.",
        )
    details = [
        ("Provider", provider.name),
        ("Isolated", "yes" if caps.isolated else "no"),
        ("Network policy", "yes" if caps.network_policy else "no"),
        ("Resource limits", "yes" if caps.resource_limits else "no"),
        ("Environment secrets", _secrets_given(caps)),
    ]
    if not health.get("ok", False):
        return Check(
            "Sandbox provider",
            "error",
            f"{provider.name}: {health.get('reason') or 'unhealthy'}",
            "Fix the reason above on the worker host (for local: DEPUTIES_SANDBOX_ROOT must be writable).",
            details,
        )
    if not caps.isolated:
        summary = f"{provider.name} runs agent commands WITHOUT isolation: {caps.reason or 'no isolation available'}"
        fix = (
            "Install bubblewrap on the worker host (`apt-get install bubblewrap`) or use "
            "DEPUTIES_SANDBOX_PROVIDER=docker."
        )
        if caps.secrets_allowed:
            summary += "; environment secrets are given to unisolated sandboxes (single-user trials only)."
        else:
            summary += "; environment secrets are withheld from its sandboxes (runs go on without them)."
            fix = (
                fix[:-1]
                + "; or, for a single-user trial, set DEPUTIES_SANDBOX_ISOLATION=none to give them anyway."
            )
        return Check("Sandbox provider", "warn", summary, fix, details)
    return Check("Sandbox provider", "ok", f"{provider.name} is healthy and isolated.", details=details)


def _secrets_given(caps) -> str:
    if caps.isolated:
        return "given" if caps.secrets_allowed else "withheld"
    if caps.secrets_allowed:
        return "given, without isolation (DEPUTIES_SANDBOX_ISOLATION=none)"
    return "withheld (not isolated)"


def check_llm() -> Check:
    providers = settings.LLM_PROVIDERS
    details = [
        (
            name,
            f"{p['kind']} at {safe_url(p['base_url'])}; API key {'set' if p.get('api_key') else 'not set'}",
        )
        for name, p in sorted(providers.items())
    ]
    details.append(("Default model", settings.DEFAULT_MODEL or "none"))
    if not providers:
        return Check(
            "LLM providers",
            "error",
            "No LLM provider is configured.",
            "Set DEPUTIES_LLM_OPENAI_API_KEY or DEPUTIES_LLM_ANTHROPIC_API_KEY (or DEPUTIES_LLM_<NAME>_BASE_URL "
            "with DEPUTIES_LLM_PROVIDERS).",
            details,
        )
    if not settings.DEFAULT_MODEL:
        return Check(
            "LLM providers",
            "warn",
            f"{len(providers)} configured; no default model, so every session must name one.",
            "Set DEPUTIES_DEFAULT_MODEL=provider/model.",
            details,
        )
    return Check("LLM providers", "ok", f"{len(providers)} configured.", details=details)


def check_storage() -> Check:
    """Files on disk need nothing; a bucket must answer HeadBucket with these keys."""
    from sessions.storage import ArtifactStorageError, bucket_storage, check_bucket

    storage = bucket_storage()
    if storage is None:
        return Check(
            "Artifact storage",
            "ok",
            "Files on this host's disk (Simple mode).",
            details=[("Directory", str(settings.MEDIA_ROOT))],
        )
    details = [
        ("Prefix", storage.location or "(none)"),
        ("Download links valid for", f"{settings.S3_URL_TTL} s"),
        (
            "Download links point at",
            safe_url(storage.public_endpoint_url or storage.endpoint_url or "") or "AWS S3",
        ),
    ]
    try:
        where = check_bucket()
    except ArtifactStorageError as exc:
        logger.warning("setup: artifact bucket check failed: %s", exc)
        return Check(
            "Artifact storage",
            "error",
            str(exc),
            "Create the bucket, or fix DEPUTIES_S3_BUCKET, DEPUTIES_S3_ENDPOINT_URL, DEPUTIES_S3_REGION "
            "and the DEPUTIES_S3_ACCESS_KEY_ID / DEPUTIES_S3_SECRET_ACCESS_KEY pair.",
            details,
        )
    return Check("Artifact storage", "ok", f"S3: {where} answers.", details=details)


def check_integrations() -> list[Check]:
    """One card per integration package, found by integrations/registry.py."""
    from integrations.registry import checks

    return checks()


def all_checks() -> list[Check]:
    return [
        check_database(),
        check_queue(),
        check_sandbox(),
        check_storage(),
        check_llm(),
        *check_integrations(),
    ]


def _seconds(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"


def _ago(when, now) -> str:
    return "never" if when is None else f"{_seconds(now - when)} ago"

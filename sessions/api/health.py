"""Probes for load balancers and orchestrators. No authentication; nothing secret in the answers.

``/healthz``: the process answers (liveness; touches nothing, so a database outage does not get
healthy web processes restarted). ``/readyz``: the database and the queue answer, and the artifact
bucket when artifacts go to S3 (readiness).
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from sessions.storage import bucket_storage

logger = logging.getLogger(__name__)


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _check_database() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"status": "ok"}


def _check_queue() -> dict[str, Any]:
    """The configured broker answers; clusters are listed when their stats are visible from here.

    django-q2 keeps cluster stats in Django's cache, so with the default per-process cache a web
    process sees no clusters even when workers run: an empty list is not a failure.
    """
    from django_q.brokers import get_broker
    from django_q.status import Stat

    broker = get_broker()
    if not broker.ping():
        raise ConnectionError("the queue broker does not answer")
    result: dict[str, Any] = {
        "status": "ok",
        "broker": type(broker).__name__,
        "queued_tasks": broker.queue_size(),
        "locked_tasks": broker.lock_size(),
    }
    clusters = []
    try:
        for stat in Stat.get_all(broker):
            clusters.append(
                {
                    "cluster_id": str(stat.cluster_id),
                    "host": stat.host,
                    "status": stat.status,
                    "workers": len(stat.workers),
                }
            )
    except Exception:  # stats are informational; the broker check above is the readiness signal
        logger.warning("could not read django-q cluster stats", exc_info=True)
    result["clusters"] = clusters
    return result


def _check_storage() -> dict[str, Any]:
    from sessions.storage import check_bucket

    check_bucket()
    return {"status": "ok"}


@never_cache
@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, Any] = {}
    failed: list[str] = []
    probes = [("database", _check_database), ("queue", _check_queue)]
    if bucket_storage() is not None:
        probes.append(("storage", _check_storage))
    for name, check in probes:
        try:
            with transaction.atomic():  # a failed check must not leave the connection in a broken transaction
                checks[name] = check()
        except Exception as exc:
            logger.warning("readiness check %s failed", name, exc_info=True)
            # The exception class only: messages can carry hostnames and user names.
            checks[name] = {"status": "error", "error": type(exc).__name__}
            failed.append(name)
    if failed:
        return JsonResponse({"status": "unavailable", "failed": failed, "checks": checks}, status=503)
    return JsonResponse({"status": "ok", "checks": checks})

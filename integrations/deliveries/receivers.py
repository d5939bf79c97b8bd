"""Run ends become HTTP callbacks: one delivery per active subscription of the session.

Connected to ``sessions.signals.run_finished``, so this runs inside the transaction that ends the
run: the deliveries (and their queue rows) commit with it, or not at all. Sessions without
subscriptions cost one indexed query.

The callback body (``event`` is ``run.completed``, ``run.failed`` or ``run.cancelled``)::

    {"event", "session": {id, title, status, source, external_ref, repository, base_branch, branch,
     pull_request_url}, "run": {id, attempt, status, error, started, finished}, "summary",
     "diff": {files: [{path, change, additions, deletions}], additions, deletions, truncated} | null,
     "cost": {usd, input_tokens, output_tokens, cached_tokens, run_usd},
     "links": {session, api, diff?}}
"""

from __future__ import annotations

from django.conf import settings
from django.dispatch import receiver

from sessions.columns import exists
from sessions.signals import finish_checks, run_finished


def _url(path: str) -> str:
    return settings.BASE_URL.rstrip("/") + path


def run_payload(run_id: int, session_id: int, status: str, error: str) -> dict:
    from sessions.models import Artifact, Run, Session
    from sessions.web.diff import read_diff

    session = Session.objects.select_related("repository").get(pk=session_id)
    run = Run.objects.get(pk=run_id)
    artifact = (
        Artifact.objects.filter(run_id=run_id, kind=Artifact.Kind.DIFF).order_by("-created", "-pk").first()
    )
    diff = None
    links = {"session": _url(f"/sessions/{session.pk}"), "api": _url(f"/api/v1/sessions/{session.pk}")}
    if artifact is not None:
        parsed = read_diff(artifact)
        diff = {
            "files": [
                {"path": f.path, "change": f.change, "additions": f.additions, "deletions": f.deletions}
                for f in parsed.files
            ],
            "additions": parsed.additions,
            "deletions": parsed.deletions,
            "truncated": parsed.truncated or any(f.truncated for f in parsed.files),
        }
        links["diff"] = _url(f"/api/v1/artifacts/{artifact.pk}/download")
    return {
        "event": f"run.{status}",
        "session": {
            "id": session.pk,
            "title": session.title,
            "status": session.status,
            "source": session.source,
            "external_ref": session.external_ref,
            "repository": session.repository.name,
            "base_branch": session.base_branch,
            "branch": session.branch,
            "pull_request_url": session.pull_request_url,
        },
        "run": {
            "id": run.pk,
            "attempt": run.attempt,
            "status": status,
            "error": error,
            "started": run.started.isoformat() if run.started else None,
            "finished": run.finished.isoformat() if run.finished else None,
        },
        "summary": session.summary if status == "completed" else "",
        "diff": diff,
        "cost": {
            "usd": str(session.cost_usd),
            "input_tokens": session.input_tokens,
            "output_tokens": session.output_tokens,
            "cached_tokens": session.cached_tokens,
            "run_usd": str(run.cost_usd),
        },
        "links": links,
    }


def _subscribed_sql() -> str:
    from integrations.deliveries.models import CallbackSubscription  # imported from ready(): apps loaded

    table = CallbackSubscription._meta.db_table
    return f'SELECT EXISTS (SELECT 1 FROM "{table}" WHERE session_id = %(finish_session)s AND active)'


finish_checks["callbacks"] = _subscribed_sql()


@receiver(run_finished, dispatch_uid="deliveries-http-callbacks")
def callbacks_for_run(
    sender, *, run_id: int, session_id: int, status: str, error: str = "", **kwargs
) -> None:
    status = str(getattr(status, "value", status))
    from integrations.deliveries.models import CallbackSubscription, Delivery
    from integrations.deliveries.services import enqueue

    subscribed = kwargs.get("checks", {}).get("callbacks")  # asked by the run's end (below)
    if subscribed is None:
        subscribed = exists(CallbackSubscription, "session_id = %s AND active", [session_id])
    if not subscribed:  # most sessions
        return
    subscriptions = list(CallbackSubscription.objects.filter(session_id=session_id, active=True))
    payload = run_payload(run_id, session_id, status, error)
    for subscription in subscriptions:
        enqueue(
            session=session_id,
            run=run_id,
            kind=Delivery.Kind.HTTP,
            event=payload["event"],
            target=subscription.url,
            subscription=subscription,
            payload=payload,
            idempotency_key=f"run-{run_id}-subscription-{subscription.pk}",
        )

"""A run of a GitHub session ended: say so on its issue/PR (a ``github`` delivery).

Connected to ``sessions.signals.run_finished``, so the comment commits with the run's end. The
publish step ran before that end, so the pull request's link is already on the session.
"""

from __future__ import annotations

from django.conf import settings
from django.dispatch import receiver

from sessions.signals import run_finished


def comment_body(session, run, status: str, error: str) -> str:
    link = f"{settings.BASE_URL.rstrip('/')}/sessions/{session.pk}"
    cost = f"${session.cost_usd:.4f} so far ({session.input_tokens + session.output_tokens} tokens)"
    if status == "completed":
        lines = ["**Deputies finished.**", "", session.summary or "(no summary)", ""]
        if session.pull_request_url:
            lines.append(f"Pull request: {session.pull_request_url}")
        else:
            lines.append("No changes to push.")
    elif status == "cancelled":
        lines = ["**Deputies stopped:** the session was cancelled.", ""]
    else:
        lines = ["**Deputies failed.**", "", f"> {error or 'unknown error'}", ""]
    lines += [
        f"Cost: {cost} · [session]({link})",
        "",
        f"<sub>Reply with `{settings.GITHUB_TRIGGER} ...` to continue.</sub>",
    ]
    return "\n".join(lines)


@receiver(run_finished, dispatch_uid="github-comment-back")
def comment_back(
    sender, *, run_id: int, session_id: int, status: str, error: str = "", source: str | None = None, **kwargs
) -> None:
    from sessions.models import Run, Session, Source

    if source is not None and source != Source.GITHUB:
        return
    session = Session.objects.filter(pk=session_id, source=Source.GITHUB).first()
    if session is None or not (session.external_ref or {}).get("github"):
        return
    from integrations.github.senders import comment

    status = str(getattr(status, "value", status))
    run = Run.objects.get(pk=run_id)
    comment(
        session,
        run=run,
        body=comment_body(session, run, status, error),
        idempotency_key=f"github-run-{run_id}",
        event=f"run.{status}",
    )

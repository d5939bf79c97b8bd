"""Deliveries of kind ``github``: the 👀 on a trigger and the comments back on the issue/PR.

One attempt is one PyGithub call (its own retries are off, see ``client``); what GitHub answers maps
onto the delivery pipeline's ``Outcome``: 5xx and connection errors are retried with back-off, a
secondary rate limit (403/429) waits for ``Retry-After`` or ``x-ratelimit-reset``, a 401 drops the
cached installation token and tries again with a new one, other 4xx end the delivery.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from integrations.deliveries.senders import Outcome, Sender, parse_retry_after, register
from integrations.github import client
from integrations.github.services import MARKER

if TYPE_CHECKING:
    from github import GithubException

log = logging.getLogger(__name__)

KIND = "github"


def acknowledge(session, trigger, guid: str) -> None:
    """The 👀 on what triggered: queued with the session (inside the webhook's transaction)."""
    from integrations.deliveries.services import enqueue

    enqueue(
        session=session,
        kind=KIND,
        event="github.reaction",
        target=f"{trigger.repo}#{trigger.number}",
        payload={
            "action": "reaction",
            "installation": trigger.installation_id,
            "repo": trigger.repo,
            "path": trigger.reaction_path,
            "content": "eyes",
        },
        idempotency_key=f"github-reaction-{guid}",
    )


def comment(
    session, *, body: str, idempotency_key: str, event: str, run=None, number: int | None = None
) -> None:
    """A comment on the session's issue/PR (or on ``number``, its pull request)."""
    from integrations.deliveries.services import enqueue

    ref = session.external_ref.get("github") or {}
    number = number or ref.get("reply_to") or ref["number"]
    enqueue(
        session=session,
        run=run,
        kind=KIND,
        event=event,
        target=f"{ref['repo']}#{number}",
        payload={
            "action": "comment",
            "installation": ref["installation"],
            "repo": ref["repo"],
            "number": number,
            "body": f"{body}\n\n{MARKER}",
        },
        idempotency_key=idempotency_key,
    )


def outcome_of(exc: GithubException) -> Outcome:
    headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
    code = exc.status
    message = (exc.data or {}).get("message", "") if isinstance(exc.data, dict) else str(exc.data or "")
    error = f"GitHub answered {code}" + (f": {message}" if message else "")
    wait = parse_retry_after(headers.get("retry-after"))
    if (
        wait is None
        and headers.get("x-ratelimit-remaining") == "0"
        and headers.get("x-ratelimit-reset", "").isdigit()
    ):
        wait = max(0.0, int(headers["x-ratelimit-reset"]) - time.time())
    limited = code == 429 or (code == 403 and (wait is not None or "rate limit" in message.lower()))
    retry = code >= 500 or limited or code == 401
    return Outcome(
        ok=False, retry=retry, status_code=code, excerpt=message[:1000], error=error, retry_after=wait
    )


@register
class GithubSender(Sender):
    kind = KIND

    def send(self, delivery, attempt: int) -> Outcome:
        import requests  # with PyGithub, only where it is used (client.github_for says why)
        from github import GithubException

        data = delivery.payload
        installation = int(data.get("installation") or 0)
        try:
            gh = client.github_for(installation)
            repo = gh.get_repo(data["repo"])
            if data["action"] == "reaction":
                gh.requester.requestJsonAndCheck(
                    "POST", f"{repo.url}{data['path']}", input={"content": data["content"]}
                )
                return Outcome(ok=True, status_code=201)
            if data["action"] == "comment":
                made = repo.get_issue(int(data["number"])).create_comment(data["body"])
                return Outcome(ok=True, status_code=201, excerpt=made.html_url or "")
            return Outcome(ok=False, error=f"unknown action {data['action']!r}")
        except GithubException as exc:
            if exc.status == 401:
                client.forget_token(installation)
            return outcome_of(exc)
        except requests.RequestException as exc:  # refused, reset, timed out: later
            return Outcome(ok=False, retry=True, error=f"{type(exc).__name__}")
        except client.NotConfigured as exc:
            return Outcome(ok=False, error=str(exc))

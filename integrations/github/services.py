"""One GitHub webhook delivery, from raw bytes to a queued session (or to nothing, on purpose).

Order: the ``X-Hub-Signature-256`` HMAC is checked on the raw body before anything is parsed (401,
nothing written). ``ping`` is answered. An event that is not a trigger is acknowledged with 202 and
forgotten. A trigger is handled in one transaction: the delivery id is claimed (a redelivery waits
for the first and then answers ``duplicate``), the commenter's permission is read from the API (not
from the payload), the repository is created in the installation's team on first use, and the
issue/PR's session is started or given a follow-up through ``sessions.bindings``; the 👀 reaction is a
delivery of kind ``github`` queued with it. An API failure rolls everything back (502), so GitHub's
"Redeliver" can try again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from integrations.github import client
from integrations.github.models import Installation, SeenDelivery
from sessions.bindings import BindingError, start_or_follow_up
from sessions.models import Repository, SessionBinding, Source, session_model
from sessions.repository_urls import RepositoryRefused, check_repository_url

logger = logging.getLogger(__name__)

WRITERS = ("admin", "maintain", "write")
# In every comment we write: with a personal access token our comments come from a person, not a bot,
# and must still never trigger anything.
MARKER = "<!-- deputies -->"
MAX_COMMENTS = 30  # the latest of the thread given to the agent
MAX_COMMENTS_READ = 300  # pages read to find them


class GithubWebhookError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.body = {"detail": detail}


@dataclass
class Answer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trigger:
    """What a triggering event asks for, read from its payload."""

    event: str
    installation_id: int
    repo: str  # owner/name
    clone_url: str
    default_branch: str
    number: int
    is_pr: bool
    title: str
    body: str
    html_url: str
    login: str
    user_id: int
    instruction: str
    reaction_path: str  # where the 👀 goes, relative to /repos/<repo>

    @property
    def key(self) -> str:
        return binding_key(self.repo, self.number)


def binding_key(repo: str, number: int) -> str:
    return f"github:{repo}#{number}"


def signature_ok(secret: str, header: str, body: bytes) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return bool(header) and hmac.compare_digest(expected, header.strip())


def phrase_in(text: str) -> str | None:
    """The request after the trigger phrase (``/deputy fix it`` -> ``fix it``), or None without one.
    The phrase counts only as a word of its own, at the start of a line or after a space."""
    phrase = settings.GITHUB_TRIGGER
    match = re.search(rf"(?:^|\s){re.escape(phrase)}(?![\w-])", text or "", re.IGNORECASE)
    if match is None:
        return None
    return (text[: match.start()] + " " + text[match.end() :]).strip()


def parse_trigger(event: str, payload: dict[str, Any]) -> Trigger | None:
    """The trigger in an event, or None for everything we ignore (including bots, us among them)."""
    action = payload.get("action")
    sender = payload.get("sender") or {}
    if sender.get("type") == "Bot" or str(sender.get("login", "")).endswith("[bot]"):
        return None
    repo = payload.get("repository") or {}
    comment = payload.get("comment") or {}
    if MARKER in (comment.get("body") or ""):
        return None
    if event == "issue_comment" and action == "created":
        item = payload.get("issue") or {}
        instruction = phrase_in(comment.get("body", ""))
        is_pr = "pull_request" in item
        reaction = f"/issues/comments/{comment.get('id')}/reactions"
    elif event == "pull_request_review_comment" and action == "created":
        item = payload.get("pull_request") or {}
        instruction = phrase_in(comment.get("body", ""))
        is_pr = True
        reaction = f"/pulls/comments/{comment.get('id')}/reactions"
    elif event == "issues" and action in ("opened", "labeled"):
        item = payload.get("issue") or {}
        label = settings.GITHUB_LABEL.lower()
        if action == "labeled":
            wanted = str((payload.get("label") or {}).get("name", "")).lower() == label
        else:
            wanted = any(str(x.get("name", "")).lower() == label for x in item.get("labels") or [])
        instruction = "" if wanted else None
        is_pr = False
        reaction = f"/issues/{item.get('number')}/reactions"
    else:
        return None
    if instruction is None or not repo.get("full_name") or not item.get("number"):
        return None
    return Trigger(
        event=event,
        installation_id=int((payload.get("installation") or {}).get("id") or 0),
        repo=repo["full_name"],
        clone_url=repo.get("clone_url", ""),
        default_branch=repo.get("default_branch") or "main",
        number=int(item["number"]),
        is_pr=is_pr,
        title=item.get("title", ""),
        body=item.get("body") or "",
        html_url=item.get("html_url", ""),
        login=sender.get("login", ""),
        user_id=int(sender.get("id") or 0),
        instruction=instruction,
        reaction_path=reaction,
    )


def receive(headers, body: bytes) -> Answer:
    """Handle one POST to /integrations/github/webhook; raises ``GithubWebhookError``."""
    secret = settings.GITHUB_WEBHOOK_SECRET
    if not secret:
        raise GithubWebhookError(
            404, "The GitHub integration is not configured (DEPUTIES_GITHUB_WEBHOOK_SECRET)."
        )
    if not signature_ok(secret, headers.get("X-Hub-Signature-256", ""), body):
        raise GithubWebhookError(401, "The X-Hub-Signature-256 signature does not match.")
    event = headers.get("X-GitHub-Event", "")
    guid = headers.get("X-GitHub-Delivery", "").strip()
    try:
        payload = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        raise GithubWebhookError(400, "The body is not JSON.") from None
    if not isinstance(payload, dict):
        raise GithubWebhookError(400, "The body is not a JSON object.")
    if event == "ping":
        return Answer(200, {"pong": True, "zen": payload.get("zen", "")})
    trigger = parse_trigger(event, payload)
    if trigger is None:
        return Answer(202, {"ignored": True, "event": event})
    if not guid or len(guid) > 100:
        raise GithubWebhookError(400, "X-GitHub-Delivery is missing or too long.")
    from github import GithubException  # only where it is used (client.github_for says why)

    try:
        return _handle(trigger, guid)
    except GithubException as exc:
        logger.warning("github webhook %s: the API answered %s", guid, exc.status)
        raise GithubWebhookError(502, f"GitHub's API answered {exc.status}; redeliver later.") from None
    except client.NotConfigured as exc:
        raise GithubWebhookError(503, str(exc)) from None


def _handle(trigger: Trigger, guid: str) -> Answer:
    installation = (
        Installation.objects.select_related("team", "environment")
        .filter(installation_id=trigger.installation_id)
        .first()
    )
    if installation is None:
        logger.warning("github: installation %s is not mapped to a team", trigger.installation_id)
        return Answer(
            202,
            {"ignored": True, "reason": f"installation {trigger.installation_id} is not mapped to a team"},
        )
    with transaction.atomic():
        try:
            with transaction.atomic():
                claim = SeenDelivery.objects.create(guid=guid, event=trigger.event)
        except IntegrityError:
            return Answer(200, {"duplicate": True})
        gh = client.github_for(trigger.installation_id)
        permission = gh.get_repo(trigger.repo).get_collaborator_permission(trigger.login)
        if permission not in WRITERS:
            logger.info("github: %s (%s) may not ask on %s", trigger.login, permission, trigger.repo)
            if settings.GITHUB_REPLY_TO_NON_WRITERS:
                _polite_reply(gh, trigger)
            return Answer(202, {"ignored": True, "reason": "the commenter has no write access"})
        model = session_model(
            installation.model, environment=installation.environment, team=installation.team
        )
        if not model:
            return Answer(202, {"ignored": True, "reason": "no model configured for this installation"})
        try:
            repository = repository_for(installation, trigger)
        except RepositoryRefused as exc:
            logger.warning("github: the clone URL of %s is refused: %s", trigger.repo, exc)
            return Answer(202, {"ignored": True, "reason": f"the repository's clone URL is refused: {exc}"})
        bound = SessionBinding.objects.filter(source=Source.GITHUB, key=trigger.key).exists()
        prompt = follow_up_prompt(trigger) if bound else first_prompt(gh, trigger)
        base_branch = "" if bound or not trigger.is_pr else pr_branch(gh, trigger)
        requester = {"login": trigger.login, "id": trigger.user_id}
        ref = {
            "github": {
                "installation": trigger.installation_id,
                "repo": trigger.repo,
                "number": trigger.number,
                "is_pr": trigger.is_pr,
                "url": trigger.html_url,
                "requested_by": requester,
            }
        }
        try:
            routed = start_or_follow_up(
                team=installation.team,
                source=Source.GITHUB,
                key=trigger.key,
                thread=f"{trigger.repo}#{trigger.number}",
                prompt=prompt,
                external_ref=ref,
                repository=repository,
                model=model,
                environment=installation.environment,
                title=trigger.title[:120] or f"{trigger.repo}#{trigger.number}",
                base_branch=base_branch,
            )
        except BindingError as exc:
            logger.warning("github: %s", exc)
            return Answer(202, {"ignored": True, "reason": "bound to another team"})
        session = routed.session
        if not routed.created:  # the co-author of what this follow-up produces
            github_ref = {
                **session.external_ref.get("github", ref["github"]),
                "requested_by": requester,
                "reply_to": trigger.number,  # the issue or the PR where this was asked
            }
            session.external_ref = {**session.external_ref, "github": github_ref}
            type(session).objects.filter(pk=session.pk).update(external_ref=session.external_ref)
        SeenDelivery.objects.filter(pk=claim.pk).update(session=session)
        from integrations.github.senders import acknowledge

        acknowledge(session, trigger, guid)
    return Answer(202, {"session": session.pk, "created": routed.created})


def repository_for(installation: Installation, trigger: Trigger) -> Repository:
    """The team's repository for ``owner/name``, created on first use."""
    team = installation.team
    existing = team.repositories.filter(url=trigger.clone_url).order_by("pk").first()
    if existing is not None:
        return existing
    check_repository_url(trigger.clone_url)  # the rules of every other way in (sessions/repository_urls.py)
    name = trigger.repo
    if team.repositories.filter(name=name).exists():
        name = f"{trigger.repo} ({trigger.installation_id})"
    return Repository.objects.create(
        team=team,
        name=name,
        url=trigger.clone_url,
        default_branch=trigger.default_branch,
        provider=Repository.Provider.GITHUB,
    )


def pr_branch(gh, trigger: Trigger) -> str:
    """A request on someone's pull request works on top of its branch (and its pull request goes
    into that branch), when the branch is in this repository; a fork's branch is not ours to
    build on, so then the default branch."""
    pull = gh.get_repo(trigger.repo).get_pull(trigger.number)
    head = pull.head
    return head.ref if head.repo is not None and head.repo.full_name == trigger.repo else ""


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 20] + "\n[... cut short]"


def first_prompt(gh, trigger: Trigger) -> str:
    """The request with its context: the issue/PR (read through the API) and its latest comments,
    within ``DEPUTIES_GITHUB_CONTEXT_CHARS``."""
    budget = settings.GITHUB_CONTEXT_CHARS
    issue = gh.get_repo(trigger.repo).get_issue(trigger.number)
    kind = "pull request" if trigger.is_pr else "issue"
    head = f"GitHub {kind} {trigger.repo}#{trigger.number}: {issue.title}\n{issue.html_url}\n\n"
    body = _bounded(issue.body or "", budget // 2)
    comments: list[str] = []
    used = len(body)
    latest = deque(islice(issue.get_comments(), MAX_COMMENTS_READ), maxlen=MAX_COMMENTS)
    for comment in reversed(latest):  # newest first, until the budget
        line = f"@{comment.user.login}: {comment.body or ''}".strip()
        if used + len(line) > budget:
            break
        comments.append(line)
        used += len(line)
    thread = "\n\n".join(reversed(comments))
    ask = trigger.instruction or f"Work on this {kind}."
    return (
        f"{head}{body}\n\n"
        + (f"Comments (oldest first):\n{thread}\n\n" if thread else "")
        + f"Request from @{trigger.login}:\n{ask}"
    )


def follow_up_prompt(trigger: Trigger) -> str:
    ask = trigger.instruction or "Continue."
    return f"Follow-up from @{trigger.login} on {trigger.repo}#{trigger.number}:\n{ask}"


def _polite_reply(gh, trigger: Trigger) -> None:
    """Best effort, in the request: there is no session to hang a delivery on."""
    from github import GithubException

    try:
        gh.get_repo(trigger.repo).get_issue(trigger.number).create_comment(
            f"@{trigger.login} only people with write access to this repository can ask Deputies for work.\n{MARKER}"
        )
    except GithubException as exc:
        logger.warning(
            "github: the polite reply on %s#%s failed (%s)", trigger.repo, trigger.number, exc.status
        )

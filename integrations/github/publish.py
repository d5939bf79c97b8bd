"""What the runner does for a GitHub session: git credentials, and the branch and pull request.

Credentials: the installation token goes to git as an ``http.<origin>/.extraHeader`` set through
``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n`` in the environment of the worker's
git process only: not in argv (``ps`` shows that), never in ``.git/config`` (the template and the
checkout keep the plain clone URL), never in the sandbox, which gets the repository as a tar. The
token and its Basic form are added to the run's redactor, so whatever the sandbox prints or an
error says has them replaced.

Publishing (after a run completed, before its end is recorded, so the comment back has the link):
the workspace's tree (``collect_diff`` wrote it into the trusted checkout) becomes a commit on the
session's branch, authored by the app with a ``Co-authored-by`` trailer for who asked; it is pushed
with the token; the first push opens a pull request, later ones update its body. A rejected push
(branch protection, someone else's commits on the branch) fails the run, saying so.
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from django.conf import settings

from integrations.github import client
from integrations.github.services import binding_key
from sessions.models import Session, SessionBinding, Source
from sessions.secrets import Secret

log = logging.getLogger(__name__)

APP_NAME = "Deputies"
APP_EMAIL = "deputies[bot]@users.noreply.github.com"


@dataclass
class Credentials:
    env: dict[str, str]
    secrets: list[Secret] = field(default_factory=list)


def credentials(session: Session) -> Credentials | None:
    """The git environment for the session's GitHub remote, or None when it is not one of ours."""
    ref = (session.external_ref or {}).get("github")
    if session.source != Source.GITHUB or not ref:
        return None
    token = client.installation_token(int(ref.get("installation") or 0))
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    parts = urlsplit(session.repository.url)
    scope = f"{parts.scheme}://{parts.netloc}/" if parts.scheme in ("http", "https") else ""
    key = f"http.{scope}.extraheader" if scope else "http.extraheader"
    env = {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": key,
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
    }
    return Credentials(env, [Secret("GITHUB_TOKEN", token, False), Secret("GITHUB_TOKEN", basic, False)])


def pr_number(url: str) -> int | None:
    match = re.search(r"/pull/(\d+)$", url or "")
    return int(match.group(1)) if match else None


def pr_body(session: Session, summary: str) -> str:
    ref = session.external_ref.get("github") or {}
    link = f"{settings.BASE_URL.rstrip('/')}/sessions/{session.pk}"
    todo = session.events.filter(type="todo").order_by("-seq").values_list("payload", flat=True).first()
    plan = "\n".join(
        f"- [{'x' if t.get('status') == 'completed' else ' '}] {t.get('content', '')}"
        for t in (todo or {}).get("todos", [])
    )
    lines = ["## Summary", "", summary or "(no summary)", ""]
    if plan:
        lines += ["## Plan", "", plan, ""]
    if ref.get("number") and not ref.get("is_pr"):
        lines += [f"Closes #{ref['number']}.", ""]
    lines += [
        f"Made by [Deputies session {session.pk}]({link}); comment `{settings.GITHUB_TRIGGER} ...` here to continue."
    ]
    return "\n".join(lines)


def remote_git(command: str, options: list[str], url: str, refs: list[str], *, cwd=None, env=None) -> str:
    """``git <command> <options> -- <url> <refs>`` against the session's remote (ls-remote, fetch,
    push): the one place here that reaches the network, so the repository URL rules
    (sessions/repository_urls.py: this transport only, the checked address pinned) apply to each."""
    from sessions.runner import git, repository_source

    source = repository_source(url)  # checked again right before git connects
    return git(command, *options, "--", source.url, *refs, cwd=cwd, env=env, source=source)


def publish(runner, result) -> None:
    """Commit, push and open or update the pull request; a no-op without new changes."""
    from github import GithubException  # only where it is used (client.github_for says why)

    from sessions.runner import StepFailed, git

    session: Session = Session.objects.select_related("repository").get(pk=runner.session.pk)
    ref = session.external_ref.get("github") or {}
    tree = getattr(runner, "tree", None)
    creds = runner.remote
    if tree is None or creds is None or not ref:
        return
    checkout = runner.checkout_dir()
    url, branch = session.repository.url, session.branch
    redact = runner.redactor.text if runner.redactor else (lambda text: text)
    try:
        remote = remote_git("ls-remote", [], url, [f"refs/heads/{branch}"], env=creds.env).split()
        if remote:  # pushed before, maybe from another worker host: build on what is there
            refspec = f"+refs/heads/{branch}:refs/heads/{branch}"
            remote_git(
                "fetch",
                ["--quiet", "--no-tags", "--update-head-ok"],
                url,
                [refspec],
                cwd=checkout,
                env=creds.env,
            )
        parent = git("rev-parse", "--verify", f"refs/heads/{branch}", cwd=checkout).strip()
        if git("rev-parse", f"{parent}^{{tree}}", cwd=checkout).strip() == tree:
            return  # nothing new since the last push
        requester = ref.get("requested_by") or {}
        message = f"{session.title or 'Deputies changes'}\n\n{result.summary or ''}".strip() + "\n"
        if requester.get("login"):
            message += (
                f"\nCo-authored-by: {requester['login']} "
                f"<{requester.get('id', 0)}+{requester['login']}@users.noreply.github.com>\n"
            )
        who = {"GIT_AUTHOR_NAME": APP_NAME, "GIT_AUTHOR_EMAIL": APP_EMAIL,
               "GIT_COMMITTER_NAME": APP_NAME, "GIT_COMMITTER_EMAIL": APP_EMAIL}  # fmt: skip
        commit = git("commit-tree", tree, "-p", parent, "-m", message, cwd=checkout, env=who).strip()
        try:
            remote_git(
                "push", ["--quiet"], url, [f"{commit}:refs/heads/{branch}"], cwd=checkout, env=creds.env
            )
        except StepFailed as exc:
            raise StepFailed(f"the push of {branch} was rejected: {exc}") from None
        git("update-ref", f"refs/heads/{branch}", commit, cwd=checkout)
    except StepFailed as exc:
        raise StepFailed(redact(str(exc))) from None
    runner.emit("branch_pushed", {"branch": branch, "commit": commit})
    try:
        pr = open_or_update(session, ref, branch, pr_body(session, result.summary))
    except GithubException as exc:
        raise StepFailed(f"pushed {branch}, but GitHub refused the pull request ({exc.status})") from None
    Session.objects.filter(pk=session.pk).update(pull_request_url=pr.html_url)
    runner.session.pull_request_url = pr.html_url
    SessionBinding.objects.get_or_create(
        source=Source.GITHUB, key=binding_key(ref["repo"], pr.number),
        defaults={"team_id": session.team_id, "session": session},
    )  # fmt: skip
    runner.emit("pull_request", {"url": pr.html_url, "number": pr.number, "branch": branch})


def open_or_update(session: Session, ref: dict, branch: str, body: str):
    gh = client.github_for(int(ref.get("installation") or 0))
    repo = gh.get_repo(ref["repo"])
    number = pr_number(session.pull_request_url)
    if number is None:
        owner = ref["repo"].split("/")[0]
        found = list(repo.get_pulls(state="open", head=f"{owner}:{branch}"))
        if not found:
            return repo.create_pull(
                base=session.base_branch, head=branch, title=session.title or branch, body=body
            )
        number = found[0].number
    pr = repo.get_pull(number)
    pr.edit(body=body)
    return pr

"""The GitHub App manifest (https://docs.github.com/apps/sharing-github-apps/registering-a-github-app-from-a-manifest):
the permissions and events this integration uses, and where the webhooks go."""

from __future__ import annotations

from django.conf import settings

PERMISSIONS = {
    "contents": "write",  # clone, push the session's branch
    "pull_requests": "write",  # open and update the pull request, react to review comments
    "issues": "write",  # read issues, comment, react
    "metadata": "read",  # collaborator permission of a commenter
}
EVENTS = ["issue_comment", "issues", "pull_request_review_comment"]


def manifest(name: str = "Deputies") -> dict:
    base = settings.BASE_URL.rstrip("/")
    return {
        "name": name,
        "url": base,
        "hook_attributes": {"url": f"{base}/integrations/github/webhook", "active": True},
        "redirect_url": f"{base}/setup",
        "public": False,
        "default_permissions": PERMISSIONS,
        "default_events": EVENTS,
    }

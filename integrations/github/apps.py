from __future__ import annotations

from django.apps import AppConfig


class GithubConfig(AppConfig):
    name = "integrations.github"
    label = "github"
    verbose_name = "GitHub"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from integrations.github import receivers, senders  # noqa: F401 - registers the sender and receiver

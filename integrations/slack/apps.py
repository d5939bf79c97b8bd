from __future__ import annotations

from django.apps import AppConfig


class SlackConfig(AppConfig):
    name = "integrations.slack"
    label = "slack"
    verbose_name = "Slack"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from integrations.slack import outbound  # registers the sender and the run_finished receiver
        from sessions.events import add_listener

        add_listener(outbound.on_events)

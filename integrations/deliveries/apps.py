from __future__ import annotations

from django.apps import AppConfig


class DeliveriesConfig(AppConfig):
    name = "integrations.deliveries"
    label = "deliveries"
    verbose_name = "Deliveries (outbound callbacks)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The http sender registers its kind; the receiver turns run ends into callbacks.
        from integrations.deliveries import receivers, senders  # noqa: F401

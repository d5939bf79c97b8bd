"""Queue entry points for deliveries: load by primary key, hand over to services."""

from __future__ import annotations


def send_delivery(delivery_id: int, attempt: int | None = None) -> str:
    from integrations.deliveries.services import send

    return send(delivery_id, attempt)


def recover_stale_deliveries() -> str:
    """Scheduled every minute (the app's first migration creates the Schedule)."""
    from integrations.deliveries.services import recover_stale

    return f"requeued {recover_stale()}"

"""The /setup card for outbound deliveries (found by integrations/registry.py)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from sessions.web.setup_checks import Check

NAME = "Outbound deliveries"
OVERDUE = timedelta(minutes=2)  # due this long ago and still pending: nothing is sending


def check() -> Check:
    from integrations.deliveries.models import Delivery

    now = timezone.now()
    rows = Delivery.objects.filter(replay_of=None)
    pending = rows.filter(status__in=(Delivery.Status.PENDING, Delivery.Status.SENDING))
    overdue = pending.filter(status=Delivery.Status.PENDING, next_attempt__lt=now - OVERDUE).count()
    failed = Delivery.objects.filter(
        status=Delivery.Status.FAILED, created__gte=now - timedelta(days=1)
    ).count()
    details = [
        ("Waiting or being sent", str(pending.count())),
        ("Failed in the last 24 h", str(failed)),
        ("Attempts per delivery", str(settings.DELIVERY_MAX_ATTEMPTS)),
        ("Callback networks opened", ", ".join(map(str, settings.CALLBACK_ALLOWED_NETWORKS)) or "none"),
    ]
    if overdue:
        return Check(
            NAME,
            "error",
            f"{overdue} delivery(ies) have been due for over {int(OVERDUE.total_seconds() // 60)} minutes.",
            "Start a worker (`deputies worker`): deliveries are sent by workers, never by the web process.",
            details,
        )
    if failed:
        return Check(
            NAME,
            "warn",
            f"{failed} delivery(ies) failed in the last 24 hours.",
            "Read their attempt log in the admin (Deliveries) and replay them once the receiver is fixed.",
            details,
        )
    if not Delivery.objects.exists():
        return Check(
            NAME,
            "off",
            "Nothing delivered yet.",
            "Give a webhook request a callback_url to get a signed callback when its run ends.",
            details,
        )
    return Check(NAME, "ok", "Deliveries are being sent.", details=details)

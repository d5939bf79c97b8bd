"""Joins main's 0007_limits and the webhooks branch's 0007 (the integrator renumbers on merge)."""

from __future__ import annotations

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("agent_sessions", "0007_limits"),
        ("agent_sessions", "0007_webhooks_session_bindings"),
    ]

    operations = []

"""Sandboxes as operators see them: which are alive, which are not isolated, which failed."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from sandboxes.models import Sandbox


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "session",
        "provider",
        "external_id",
        "status",
        "isolated",
        "created",
        "last_used",
        "destroyed",
    ]
    list_filter = ["status", "provider", "isolated"]
    search_fields = ["external_id", "isolation_note", "error", "session__title"]
    date_hierarchy = "created"
    list_select_related = ["session"]
    raw_id_fields = ["session"]
    readonly_fields = [
        "session",
        "provider",
        "external_id",
        "status",
        "isolated",
        "isolation_note",
        "created",
        "last_used",
        "destroyed",
        "error",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the worker creates sandboxes through a provider

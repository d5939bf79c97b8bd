"""Sandboxes as operators see them: which are alive, which are not isolated, which failed."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from sandboxes.models import Sandbox
from sandboxes.reaper import destroy_sandbox


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
    actions = ["destroy_sandboxes"]
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
        "prepared",
        "error",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the worker creates sandboxes through a provider

    @admin.action(description="Destroy selected sandboxes", permissions=["change"])
    def destroy_sandboxes(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
        """Ready sandboxes whose session has no active run; a busy one is left for its run to finish."""
        destroyed, failed = 0, []
        skipped = queryset.exclude(status=Sandbox.Status.READY).count()
        for sandbox in queryset.filter(status=Sandbox.Status.READY):
            try:
                if destroy_sandbox(sandbox, f"destroyed by {request.user} in the admin"):
                    destroyed += 1
                else:
                    skipped += 1
            except Exception as exc:
                failed.append(f"{sandbox.external_id}: {exc}")
        self.message_user(request, f"Destroyed {destroyed} sandboxes.", messages.SUCCESS)
        if skipped:
            self.message_user(
                request,
                f"Skipped {skipped}: already destroyed, not ready, or in use by an active run.",
                messages.WARNING,
            )
        for failure in failed:
            self.message_user(request, f"Could not destroy {failure}", messages.ERROR)

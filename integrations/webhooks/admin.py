"""Operators add and inspect sources here; new credentials are shown once, in the save message."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest

from integrations.webhooks.models import DedupeKey, SeenSignature, WebhookSource


@admin.register(WebhookSource)
class WebhookSourceAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "team", "auth", "repository", "enabled", "last_used"]
    list_filter = ["auth", "enabled", "team"]
    search_fields = ["name", "slug"]
    autocomplete_fields = ["team"]
    filter_horizontal = ["allowed_repositories"]
    readonly_fields = ["token_prefix", "url", "created", "last_used"]
    actions = ["rotate_credentials"]

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        # The kind of credentials is fixed once issued: changing it needs new ones (rotate).
        return [*self.readonly_fields, "auth"] if obj else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: WebhookSource, form, change: bool) -> None:
        shown = None if change else obj.issue_credentials()
        super().save_model(request, obj, form, change)
        if shown:
            self._show(request, obj, shown)

    @admin.action(description="Issue new credentials (the old ones stop working)")
    def rotate_credentials(self, request: HttpRequest, queryset) -> None:
        for source in queryset:
            self._show(request, source, source.rotate_credentials())

    def _show(self, request: HttpRequest, source: WebhookSource, shown: dict[str, str]) -> None:
        parts = "; ".join(f"{name.replace('_', ' ')}: {value}" for name, value in shown.items())
        messages.warning(request, f"{source.slug}: copy these now, they are not shown again. {parts}")


@admin.register(DedupeKey)
class DedupeKeyAdmin(admin.ModelAdmin):
    list_display = ["key", "source", "session", "created"]
    list_filter = ["source"]
    search_fields = ["key"]
    raw_id_fields = ["session"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(SeenSignature)
class SeenSignatureAdmin(admin.ModelAdmin):
    """Signatures accepted within the last five minutes (a second use is a replay)."""

    list_display = ["signature", "source", "timestamp"]
    list_filter = ["source"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

from __future__ import annotations

from django.contrib import admin

from integrations.github.models import Installation, SeenDelivery


@admin.register(Installation)
class InstallationAdmin(admin.ModelAdmin):
    list_display = ["installation_id", "account", "team", "environment", "model", "created"]
    list_select_related = ["team", "environment"]
    search_fields = ["account", "installation_id"]


@admin.register(SeenDelivery)
class SeenDeliveryAdmin(admin.ModelAdmin):
    list_display = ["guid", "event", "session", "created"]
    readonly_fields = ["guid", "event", "session", "created"]
    search_fields = ["guid"]

    def has_add_permission(self, request) -> bool:
        return False

"""Deliveries in the operator console: each with its attempt log inline, and a replay action."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from integrations.deliveries import services
from integrations.deliveries.models import CallbackSubscription, Delivery, DeliveryAttempt


class AttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    fields = [
        "number",
        "started",
        "duration_ms",
        "status_code",
        "error",
        "response_excerpt",
        "retry_in_seconds",
    ]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "session",
        "kind",
        "event",
        "shown_target",
        "status",
        "attempts",
        "created",
        "delivered",
    ]
    list_filter = ["status", "kind", "event"]
    search_fields = ["idempotency_key", "target", "last_error"]
    list_select_related = ["session"]
    date_hierarchy = "created"
    actions = ["replay_deliveries"]
    inlines = [AttemptInline]
    exclude = ["target"]  # may carry a token; shown without its query string
    readonly_fields = [
        "session", "run", "subscription", "kind", "event", "shown_target", "payload", "idempotency_key",
        "status", "attempts", "max_attempts", "next_attempt", "claimed_at", "created", "delivered",
        "last_status_code", "last_error", "replay_of",
    ]  # fmt: skip

    @admin.display(description="target")
    def shown_target(self, obj: Delivery) -> str:
        return obj.display_target

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Replay selected deliveries", permissions=["change"])
    def replay_deliveries(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        done = skipped = 0
        for delivery in queryset:
            try:
                services.replay(delivery)
                done += 1
            except services.NotReplayable:
                skipped += 1
        self.message_user(request, f"Queued {done} replay(s).", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} delivery(ies) are still being sent.", messages.WARNING)


@admin.register(CallbackSubscription)
class CallbackSubscriptionAdmin(admin.ModelAdmin):
    list_display = ["id", "session", "shown_url", "label", "active", "created"]
    list_filter = ["active"]
    fields = ["session", "shown_url", "label", "active", "created"]
    readonly_fields = ["session", "shown_url", "created"]

    @admin.display(description="URL")
    def shown_url(self, obj: CallbackSubscription) -> str:
        from integrations.deliveries.models import display_url

        return display_url(obj.url)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

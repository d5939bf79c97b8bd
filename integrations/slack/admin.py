"""Operators connect workspaces, allow channels (with their defaults) and map Slack users here."""

from __future__ import annotations

from django.contrib import admin

from integrations.slack.models import SeenRequest, SlackChannel, SlackThread, SlackUser, SlackWorkspace
from sessions.admin import ReadOnlyAdmin


class SlackChannelInline(admin.TabularInline):
    model = SlackChannel
    extra = 0
    fields = ["name", "channel_id", "team", "repository", "environment", "model", "enabled"]
    autocomplete_fields = ["team"]


@admin.register(SlackWorkspace)
class SlackWorkspaceAdmin(admin.ModelAdmin):
    list_display = ["__str__", "slack_team_id", "team", "enabled", "all_channels"]
    list_filter = ["enabled", "all_channels"]
    search_fields = ["name", "slack_team_id"]
    autocomplete_fields = ["team"]
    inlines = [SlackChannelInline]


@admin.register(SlackChannel)
class SlackChannelAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "channel_id",
        "workspace",
        "team",
        "repository",
        "environment",
        "model",
        "enabled",
    ]
    list_filter = ["enabled", "workspace", "team"]
    search_fields = ["name", "channel_id"]
    autocomplete_fields = ["team"]


@admin.register(SlackUser)
class SlackUserAdmin(admin.ModelAdmin):
    """An explicit mapping (``via`` admin) wins over the email lookup and is never overwritten by it."""

    list_display = ["slack_user_id", "workspace", "user", "via", "email", "looked_up"]
    list_filter = ["via", "workspace"]
    search_fields = ["slack_user_id", "email", "user__username", "user__email"]
    readonly_fields = ["looked_up"]
    raw_id_fields = ["user"]

    def save_model(self, request, obj: SlackUser, form, change: bool) -> None:
        obj.via = SlackUser.Via.ADMIN
        super().save_model(request, obj, form, change)


@admin.register(SlackThread)
class SlackThreadAdmin(ReadOnlyAdmin):
    list_display = ["session", "workspace", "channel_id", "thread_ts", "trigger", "requester", "created"]
    list_filter = ["trigger", "workspace"]
    search_fields = ["channel_id", "thread_ts", "requester"]


@admin.register(SeenRequest)
class SeenRequestAdmin(ReadOnlyAdmin):
    list_display = ["key", "received", "session"]
    search_fields = ["key"]

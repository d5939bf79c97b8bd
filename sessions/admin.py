"""The operator console. State changes go through the model methods (cancel, retry), never raw edits."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from sessions.automations import Automation, AutomationFiring, ScheduledMessage, cron_problem, zone_problem
from sessions.budgets import team_month_spend
from sessions.limits import wake_after_commit, wake_waiting_runs
from sessions.models import (
    AgentProfile,
    APIToken,
    Artifact,
    Environment,
    EnvironmentSecret,
    Event,
    LLMCall,
    McpServer,
    Membership,
    Message,
    RateCounter,
    Repository,
    Run,
    Session,
    SessionBinding,
    Skill,
    Team,
    WebResult,
    WorkerProcess,
)
from sessions.secrets import MAX_SECRET_BYTES, MIN_SECRET_LENGTH, encrypt

# A session page shows this many of the latest events; the Event list has them all.
EVENTS_INLINE_LIMIT = 500


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by runs: operators look, the runner writes."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


# --- teams ----------------------------------------------------------------------------------------


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "slug",
        "member_count",
        "monthly_budget_usd",
        "spent_this_month",
        "max_concurrent_runs",
        "created",
    ]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]

    def save_model(self, request: HttpRequest, obj: Team, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "max_concurrent_runs" in form.changed_data:
            # A raised or removed limit starts waiting runs now, not at the next run's end.
            limit = obj.concurrency_limit()
            if limit:
                wake_after_commit(obj.pk, limit)
            else:
                transaction.on_commit(lambda: wake_waiting_runs(obj.pk, 0, lifted=True))

    @admin.display(description="members")
    def member_count(self, obj: Team) -> int:
        return obj.memberships.count()

    @admin.display(description="spent this month (USD)")
    def spent_this_month(self, obj: Team) -> str:
        return f"{team_month_spend(obj.pk):.2f}"


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "team", "role", "created"]
    list_filter = ["role", "team"]
    search_fields = ["user__username", "user__email", "team__name", "team__slug"]
    autocomplete_fields = ["user", "team"]
    list_select_related = ["user", "team"]


# --- repositories and environments ----------------------------------------------------------------


@admin.register(Repository)
class RepositoryAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "provider", "url", "default_branch", "created"]
    list_filter = ["provider", "team"]
    search_fields = ["name", "url"]
    list_select_related = ["team"]
    autocomplete_fields = ["team"]


class EnvironmentSecretForm(forms.ModelForm):
    """The value is write-only: shown empty, and left empty it keeps the stored one."""

    value = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Encrypted at rest and never shown again. Leave empty to keep the current value.",
    )

    class Meta:
        model = EnvironmentSecret
        fields = ["environment", "name", "value", "sandbox_visible"]

    def clean(self) -> dict:
        data = super().clean()
        value = data.get("value") or ""
        if not self.instance.pk and not value:
            self.add_error("value", "A new secret needs a value.")
        elif value and len(value) < MIN_SECRET_LENGTH:
            self.add_error("value", f"At least {MIN_SECRET_LENGTH} characters, so it can be redacted.")
        elif len(value.encode()) > MAX_SECRET_BYTES:
            self.add_error("value", f"At most {MAX_SECRET_BYTES} bytes.")
        return data

    def save(self, commit: bool = True) -> EnvironmentSecret:
        if self.cleaned_data.get("value"):
            self.instance.ciphertext = encrypt(self.cleaned_data["value"])
        return super().save(commit)


@admin.register(EnvironmentSecret)
class EnvironmentSecretAdmin(admin.ModelAdmin):
    """Every secret by name, across environments; values are write-only here too."""

    form = EnvironmentSecretForm
    fields = ["environment", "name", "value", "sandbox_visible", "created", "updated"]
    readonly_fields = ["created", "updated"]
    list_display = ["name", "environment", "sandbox_visible", "updated"]
    list_filter = ["sandbox_visible", "environment__team"]
    search_fields = ["name", "environment__name"]
    list_select_related = ["environment__team"]
    autocomplete_fields = ["environment"]

    def save_model(self, request: HttpRequest, obj: EnvironmentSecret, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        obj.environment.save(update_fields=["revision", "updated"])  # a new environment revision

    def delete_model(self, request: HttpRequest, obj: EnvironmentSecret) -> None:
        self.delete_queryset(request, EnvironmentSecret.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[EnvironmentSecret]) -> None:
        environments = Environment.objects.filter(pk__in=queryset.values("environment"))
        touched = list(environments)
        queryset.delete()
        for environment in touched:
            environment.save(update_fields=["revision", "updated"])


class EnvironmentSecretInline(admin.TabularInline):
    model = EnvironmentSecret
    form = EnvironmentSecretForm
    extra = 0
    fields = ["name", "value", "sandbox_visible", "updated"]
    readonly_fields = ["updated"]


@admin.register(Environment)
class EnvironmentAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "team",
        "revision",
        "sandbox_provider",
        "network_policy",
        "default_model",
        "updated",
    ]
    list_filter = ["team", "sandbox_provider", "network_policy"]
    search_fields = ["name", "image", "default_model"]
    readonly_fields = ["revision", "created", "updated"]
    list_select_related = ["team"]
    autocomplete_fields = ["team"]
    inlines = [EnvironmentSecretInline]

    def save_related(self, request: HttpRequest, form, formsets, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        # A secret changed on its own is still a new revision of the environment.
        if change and not form.has_changed() and any(f.has_changed() for f in formsets):
            form.instance.save(update_fields=["revision", "updated"])


# --- sessions ---------------------------------------------------------------------------------------


class MessageInline(ReadOnlyInline):
    model = Message
    fields = ["position", "status", "steer", "author", "content", "run", "created"]
    readonly_fields = fields
    ordering = ["position"]


class RunInline(ReadOnlyInline):
    model = Run
    fields = [
        "attempt",
        "status",
        "lease_owner",
        "started",
        "finished",
        "steps",
        "waiting",
        "cost_usd",
        "error",
    ]
    readonly_fields = fields
    ordering = ["attempt"]


class EventInline(ReadOnlyInline):
    model = Event
    fields = ["seq", "type", "run", "payload", "created"]
    readonly_fields = fields
    ordering = ["seq"]
    show_change_link = False
    verbose_name_plural = f"events (the latest {EVENTS_INLINE_LIMIT})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Event]:
        queryset = super().get_queryset(request)
        session_id = (request.resolver_match.kwargs if request.resolver_match else {}).get("object_id")
        if session_id and str(session_id).isdigit():
            latest = Event.objects.filter(session_id=session_id).order_by("-seq")[:EVENTS_INLINE_LIMIT]
            queryset = queryset.filter(pk__in=latest.values("pk"))
        return queryset


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "title",
        "team",
        "repository",
        "status",
        "source",
        "model",
        "created_by",
        "cost_usd",
        "created",
    ]
    list_display_links = ["id", "title"]
    list_filter = ["status", "source", "team", "model", "depth"]
    search_fields = ["title", "summary", "branch", "pull_request_url", "repository__name"]
    date_hierarchy = "created"
    list_select_related = ["team", "repository", "created_by"]
    actions = ["cancel_sessions", "retry_sessions"]
    inlines = [MessageInline, RunInline, EventInline]
    # Status and usage change only through runs and the actions above.
    readonly_fields = [
        "team",
        "created_by",
        "repository",
        "base_branch",
        "branch",
        "environment",
        "environment_revision",
        "model",
        "status",
        "source",
        "external_ref",
        "pull_request_url",
        "summary",
        "error",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "cost_usd",
        "last_seq",
        "parent",
        "depth",
        "children_cost_usd",
        "created",
        "updated",
        "finished",
    ]
    exclude = ["transcript"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions start through start_session (web, API, integrations)

    @admin.action(description="Cancel selected sessions", permissions=["change"])
    def cancel_sessions(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        done = skipped = 0
        for session in queryset:
            if session.cancel():
                done += 1
            else:
                skipped += 1
        self.message_user(request, f"Cancelled {done} session(s).", messages.SUCCESS)
        if skipped:
            self.message_user(
                request, f"{skipped} session(s) were already cancelled or archived.", messages.WARNING
            )

    @admin.action(description="Retry selected sessions", permissions=["change"])
    def retry_sessions(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        done = skipped = 0
        for session in queryset:
            if session.retry() is not None:
                done += 1
            else:
                skipped += 1
        self.message_user(request, f"Queued a new run for {done} session(s).", messages.SUCCESS)
        if skipped:
            self.message_user(
                request,
                f"{skipped} session(s) still have an active run; cancel them first.",
                messages.WARNING,
            )


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ["session", "position", "status", "author", "created"]
    list_filter = ["status"]
    search_fields = ["content"]
    date_hierarchy = "created"
    list_select_related = ["session", "author"]
    raw_id_fields = ["session", "run"]


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "session",
        "attempt",
        "status",
        "lease_owner",
        "heartbeat",
        "started",
        "finished",
        "cost_usd",
    ]
    list_filter = ["status"]
    search_fields = ["lease_owner", "error", "session__title"]
    date_hierarchy = "created"
    list_select_related = ["session"]
    raw_id_fields = ["session"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("checkpoint")  # a running run's whole conversation


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    """Append-only: no add, change or delete."""

    list_display = ["session", "seq", "type", "run", "created"]
    list_filter = ["type"]
    search_fields = ["type", "session__title"]
    date_hierarchy = "created"
    list_select_related = ["session"]
    raw_id_fields = ["session", "run"]
    ordering = ["-session", "seq"]

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(SessionBinding)
class SessionBindingAdmin(ReadOnlyAdmin):
    """External threads (webhook, Slack, GitHub) bound to sessions; deleting one unbinds the thread."""

    list_display = ["key", "source", "session", "team", "created"]
    list_filter = ["source"]
    search_fields = ["key"]
    list_select_related = ["session", "team"]
    raw_id_fields = ["session"]


@admin.register(Artifact)
class ArtifactAdmin(ReadOnlyAdmin):
    list_display = ["name", "kind", "session", "size", "content_type", "created", "download"]
    list_filter = ["kind"]
    search_fields = ["name", "sha256"]
    date_hierarchy = "created"
    list_select_related = ["session"]
    raw_id_fields = ["session", "run"]

    @admin.display(description="download")
    def download(self, obj: Artifact) -> str:
        return format_html('<a href="{}">download</a>', reverse("api-artifact-download", args=[obj.pk]))


@admin.register(LLMCall)
class LLMCallAdmin(ReadOnlyAdmin):
    list_display = [
        "created",
        "session",
        "provider",
        "model",
        "outcome",
        "status_code",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "cost_usd",
        "latency_ms",
    ]
    list_filter = ["outcome", "provider", "model"]
    search_fields = ["model", "error"]
    date_hierarchy = "created"
    list_select_related = ["session"]
    raw_id_fields = ["session", "run"]


@admin.register(APIToken)
class APITokenAdmin(ReadOnlyAdmin):
    """Tokens are created with ``deputies token create``; here they can be seen and revoked (deleted)."""

    list_display = ["prefix", "name", "user", "created", "last_used"]
    list_filter = ["created", "last_used"]
    search_fields = ["name", "prefix", "user__username"]
    list_select_related = ["user"]
    fields = ["user", "name", "prefix", "created", "last_used"]  # never key_hash
    readonly_fields = fields


@admin.register(RateCounter)
class RateCounterAdmin(admin.ModelAdmin):
    """Who is near their API rate limit in the current window (sessions/api/throttles.py); read-only."""

    list_display = ["key", "hits", "window_start"]
    search_fields = ["key"]
    ordering = ["-hits"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


# --- what shapes an agent (sessions/agent_models.py) ----------------------------------------------


class McpServerForm(forms.ModelForm):
    """The API's checks (sessions/agent/mcp.py): the address rules, and headers that name secrets."""

    class Meta:
        model = McpServer
        fields = ["team", "name", "url", "headers", "enabled", "timeout_seconds"]

    def clean_url(self) -> str:
        from sessions.agent.mcp import url_problem

        url = self.cleaned_data["url"].strip()
        if problem := url_problem(url):
            raise forms.ValidationError(problem)
        return url

    def clean(self) -> dict:
        from sessions.agent.mcp import header_problems

        cleaned = super().clean()
        team = cleaned.get("team")
        if team is not None and "headers" in cleaned:
            for header, problem in header_problems(cleaned["headers"] or {}, team.pk).items():
                self.add_error("headers", f"{header}: {problem}" if header else problem)
        return cleaned


class AgentProfileForm(forms.ModelForm):
    class Meta:
        model = AgentProfile
        fields = "__all__"

    def clean_allowed_tools(self) -> list:
        from sessions.agent_models import clean_tool_names

        try:
            return clean_tool_names(self.cleaned_data["allowed_tools"] or [])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


@admin.register(AgentProfile)
class AgentProfileAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "model", "summary_model", "max_steps", "budget_usd", "updated"]
    list_filter = ["team"]
    search_fields = ["name", "description", "model"]
    autocomplete_fields = ["team"]
    readonly_fields = ["created", "updated"]
    form = AgentProfileForm


@admin.register(Skill)
class SkillAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "owner", "description", "revision", "updated"]
    list_filter = ["team"]
    search_fields = ["name", "description", "body"]
    autocomplete_fields = ["team"]
    raw_id_fields = ["owner"]
    readonly_fields = ["revision", "created", "updated"]


@admin.register(McpServer)
class McpServerAdmin(admin.ModelAdmin):
    """A team's remote MCP servers. Headers name environment secrets as ${NAME}; never values."""

    form = McpServerForm
    list_display = ["name", "team", "url", "enabled", "created"]
    list_filter = ["team", "enabled"]
    search_fields = ["name", "url"]
    autocomplete_fields = ["team"]


@admin.register(WebResult)
class WebResultAdmin(ReadOnlyAdmin):
    """Pages and searches cached per session by web_fetch / web_search."""

    list_display = ["session", "kind", "key", "created"]
    list_filter = ["kind"]
    search_fields = ["key"]
    raw_id_fields = ["session"]


@admin.register(WorkerProcess)
class WorkerProcessAdmin(admin.ModelAdmin):
    """Read-only: rows are the workers' own heartbeats (deputies/worker.py)."""

    list_display = ["name", "last_seen", "running", "slots", "started"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


# --- automations (sessions/automations.py) ------------------------------------------------------


class AutomationAdminForm(forms.ModelForm):
    class Meta:
        model = Automation
        fields = [
            "team",
            "name",
            "cron",
            "timezone",
            "prompt",
            "repository",
            "environment",
            "profile",
            "model",
            "created_by",
        ]

    def clean_cron(self) -> str:
        value = " ".join(self.cleaned_data["cron"].split())
        if problem := cron_problem(value):
            raise forms.ValidationError(problem)
        return value

    def clean_timezone(self) -> str:
        value = self.cleaned_data["timezone"].strip()
        if problem := zone_problem(value):
            raise forms.ValidationError(problem)
        return value

    def clean(self):
        data = super().clean()
        team = data.get("team")
        for name in ("repository", "environment", "profile"):
            value = data.get(name)
            if team is not None and value is not None and value.team_id != team.pk:
                self.add_error(name, f"It belongs to another team than {team}.")
        return data


class AutomationFiringInline(ReadOnlyInline):
    model = AutomationFiring
    fields = ["due_at", "fired_at", "session", "skipped"]
    readonly_fields = fields
    ordering = ["-due_at"]
    show_change_link = False

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).select_related("session")


class AutomationAdmin(admin.ModelAdmin):
    form = AutomationAdminForm
    list_display = [
        "name",
        "team",
        "cron",
        "timezone",
        "paused",
        "next_fire_at",
        "last_fired_at",
        "last_session",
    ]
    list_filter = ["paused", "team"]
    search_fields = ["name", "prompt"]
    list_select_related = ["team", "last_session"]
    readonly_fields = ["paused", "next_fire_at", "last_fired_at", "last_session", "created", "updated"]
    inlines = [AutomationFiringInline]
    actions = ["pause_automations", "resume_automations"]

    def save_model(self, request: HttpRequest, obj, form, change: bool) -> None:
        if change and {"cron", "timezone"} & set(form.changed_data) and not obj.paused:
            obj.schedule()
        super().save_model(request, obj, form, change)

    @admin.action(description="Pause selected automations", permissions=["change"])
    def pause_automations(self, request: HttpRequest, queryset: QuerySet) -> None:
        done = sum(1 for automation in queryset if automation.pause())
        self.message_user(request, f"Paused {done} automation(s).", messages.SUCCESS)

    @admin.action(
        description="Resume selected automations (from their next occurrence)", permissions=["change"]
    )
    def resume_automations(self, request: HttpRequest, queryset: QuerySet) -> None:
        done = sum(1 for automation in queryset if automation.resume())
        self.message_user(request, f"Resumed {done} automation(s).", messages.SUCCESS)


class ScheduledMessageAdmin(admin.ModelAdmin):
    list_display = ["session", "due_at", "status", "steer", "created_by"]
    list_filter = ["status"]
    list_select_related = ["session", "created_by"]
    raw_id_fields = ["session", "message"]
    readonly_fields = ["status", "message", "error", "created"]
    actions = ["cancel_messages"]

    @admin.action(description="Cancel selected scheduled follow-ups", permissions=["change"])
    def cancel_messages(self, request: HttpRequest, queryset: QuerySet) -> None:
        done = sum(1 for scheduled in queryset if scheduled.cancel())
        self.message_user(request, f"Cancelled {done} scheduled follow-up(s).", messages.SUCCESS)


class AutomationFiringAdmin(admin.ModelAdmin):
    """The history of occurrences: written by the scheduler only."""

    list_display = ["automation", "due_at", "fired_at", "session", "skipped"]
    list_filter = ["automation__team"]
    list_select_related = ["automation", "session"]
    readonly_fields = ["automation", "due_at", "fired_at", "session", "skipped"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


admin.site.register(Automation, AutomationAdmin)
admin.site.register(AutomationFiring, AutomationFiringAdmin)
admin.site.register(ScheduledMessage, ScheduledMessageAdmin)

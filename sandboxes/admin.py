"""Sandboxes as operators see them: which are alive, which are not isolated, which failed, what ran."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from sandboxes.base import SandboxError, SandboxLogs, get_provider
from sandboxes.models import Sandbox
from sandboxes.reaper import destroy_sandbox
from sessions.models import Artifact, Event

LOG_TAIL = 500  # container log lines shown by default; ?tail=N asks for more, up to LOG_TAIL_MAX
LOG_TAIL_MAX = 10_000
EVENTS_LIMIT = 2000  # the newest command events a logs page reads
OUTPUT_SHOWN = 20_000  # characters of one command's output on the page (the tail; artifacts keep all)
SHELL_TOOLS = ["bash", "shell"]
EXIT_CODE = re.compile(r"\[exit code (-?\d+)\]\s*$")
RUN_EVENTS = ["sandbox_ready", "run_started", "run_completed", "run_failed"]
SETUP_EVENTS = ["setup_output", "setup_finished"]


@dataclass
class Step:
    """One line of the page's "what ran" list, built from the session's events."""

    kind: str  # "sandbox", "run", "setup" or "command"
    seq: int
    created: Any
    title: str = ""
    command: str = ""
    output: str = ""
    stderr: str = ""  # a setup script's stderr, kept apart so it can be told from its stdout
    status: str = ""  # "exit 0", "exit 2", "timed out", "no result recorded"...
    ok: bool | None = None
    artifact_id: int | None = None

    def add_output(self, text: str) -> None:
        self.output = _bounded(self.output + text)

    @property
    def shown_output(self) -> str:
        return _shown(self.output)

    @property
    def shown_stderr(self) -> str:
        return _shown(self.stderr)


def _bounded(text: str) -> str:
    """Keeps memory bounded while a long setup log is coalesced."""
    return text[-OUTPUT_SHOWN - 1 :] if len(text) > 2 * OUTPUT_SHOWN else text


def _shown(text: str) -> str:
    if len(text) <= OUTPUT_SHOWN:
        return text
    return f"[... earlier output not shown here ...]\n{text[-OUTPUT_SHOWN:]}"


def sandbox_events(sandbox: Sandbox) -> QuerySet[Event]:
    """The session's events from this sandbox's ``sandbox_ready`` up to the next sandbox's.

    Follow-up runs reuse a live sandbox without a new ``sandbox_ready``, so everything until another
    sandbox is announced happened here. A sandbox that never got ready is bounded by its times.
    """
    events = Event.objects.filter(session_id=sandbox.session_id)
    ready = None
    if sandbox.external_id:
        ready = (
            events.filter(type="sandbox_ready", payload__sandbox_id=sandbox.external_id)
            .order_by("seq")
            .first()
        )
    if ready is None:
        scoped = events.filter(created__gte=sandbox.created)
        if sandbox.destroyed:
            scoped = scoped.filter(created__lte=sandbox.destroyed)
        following = scoped.filter(type="sandbox_ready").order_by("seq").first()  # another sandbox's
    else:
        scoped = events.filter(seq__gte=ready.seq)
        following = scoped.filter(type="sandbox_ready", seq__gt=ready.seq).order_by("seq").first()
    return scoped.filter(seq__lt=following.seq) if following is not None else scoped


def sandbox_steps(sandbox: Sandbox) -> tuple[list[Step], bool]:
    """(what ran in the sandbox, oldest first; whether older events were left out)."""
    wanted = Q(type__in=RUN_EVENTS + SETUP_EVENTS) | Q(
        type__in=["tool_started", "tool_finished"], payload__name__in=SHELL_TOOLS
    )
    rows = list(sandbox_events(sandbox).filter(wanted).order_by("-seq")[: EVENTS_LIMIT + 1])
    cut = len(rows) > EVENTS_LIMIT
    steps: list[Step] = []
    commands: dict[str, Step] = {}
    setup: Step | None = None
    for event in reversed(rows[:EVENTS_LIMIT]):
        p = event.payload if isinstance(event.payload, dict) else {}
        if event.type == "setup_output":
            if setup is None or setup.status:
                setup = Step("setup", event.seq, event.created, title="repository setup script")
                steps.append(setup)
            if p.get("stream") == "stderr":
                setup.stderr = _bounded(setup.stderr + str(p.get("text", "")))
            else:
                setup.add_output(str(p.get("text", "")))
        elif event.type == "setup_finished":
            if setup is None or setup.status:
                setup = Step("setup", event.seq, event.created, title="repository setup script")
                steps.append(setup)
            code = p.get("exit_code")
            setup.status = "timed out" if p.get("timed_out") else f"exit {code}"
            setup.ok = code == 0 and not p.get("timed_out")
            if p.get("duration") is not None:
                setup.title += f" ({p['duration']} s)"
        elif event.type == "tool_started":
            arguments = p.get("arguments")
            command = arguments.get("command", "") if isinstance(arguments, dict) else arguments
            step = Step("command", event.seq, event.created, title=str(p.get("name")), command=str(command))
            step.status = "no result recorded"
            commands[str(p.get("call_id"))] = step
            steps.append(step)
        elif event.type == "tool_finished":
            step = commands.pop(str(p.get("call_id")), None)
            if step is None:  # its start is older than what was read
                step = Step("command", event.seq, event.created, title=str(p.get("name")))
                steps.append(step)
            output = str(p.get("output", ""))
            step.add_output(output)
            step.ok = bool(p.get("ok"))
            match = EXIT_CODE.search(output)
            step.status = f"exit {match.group(1)}" if match else ("ok" if step.ok else "failed")
            step.artifact_id = p.get("artifact_id")
        elif event.type == "sandbox_ready":
            note = "isolated" if p.get("isolated") else f"not isolated: {p.get('reason', '')}"
            steps.append(
                Step(
                    "sandbox", event.seq, event.created, title=f"sandbox ready ({p.get('provider')}, {note})"
                )
            )
        elif event.type == "run_started":
            steps.append(
                Step("run", event.seq, event.created, title=f"run started (attempt {p.get('attempt')})")
            )
        elif event.type == "run_completed":
            steps.append(Step("run", event.seq, event.created, title="run completed", ok=True))
        elif event.type == "run_failed":
            steps.append(
                Step(
                    "run",
                    event.seq,
                    event.created,
                    title="run failed",
                    output=str(p.get("error", "")),
                    ok=False,
                )
            )
    return steps, cut


def provider_logs(sandbox: Sandbox, tail: int) -> tuple[SandboxLogs | None, str]:
    """(the provider's view of the sandbox, or why there is none)."""
    if not sandbox.external_id:
        return None, "the provider never returned a sandbox id for this row, so there is nothing to ask it"
    try:
        return get_provider(sandbox.provider).logs(sandbox.external_id, tail=tail), ""
    except SandboxError as exc:
        return None, str(exc)


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
        "logs_link",
    ]
    list_filter = ["status", "provider", "isolated"]
    search_fields = ["external_id", "isolation_note", "error", "session__title"]
    date_hierarchy = "created"
    list_select_related = ["session"]
    raw_id_fields = ["session"]
    actions = ["open_logs", "destroy_sandboxes"]
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

    def get_urls(self):
        logs = path(
            "<path:object_id>/logs/",
            self.admin_site.admin_view(self.logs_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_logs",
        )
        return [logs, *super().get_urls()]

    @admin.display(description="logs")
    def logs_link(self, obj: Sandbox) -> str:
        return format_html('<a href="{}">logs</a>', logs_url(obj))

    def logs_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        sandbox = self.get_object(request, unquote(object_id))
        if sandbox is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_view_permission(request, sandbox):
            raise PermissionDenied
        try:
            tail = min(max(int(request.GET.get("tail", LOG_TAIL)), 1), LOG_TAIL_MAX)
        except ValueError:
            tail = LOG_TAIL
        logs, logs_error = provider_logs(sandbox, tail)
        steps, cut = sandbox_steps(sandbox)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Logs of sandbox {sandbox.external_id or sandbox.pk}",
            "sandbox": sandbox,
            "logs": logs,
            "logs_error": logs_error,
            "tail": tail,
            "steps": steps,
            "steps_cut": cut,
            "events_limit": EVENTS_LIMIT,
            "artifacts": Artifact.objects.filter(session_id=sandbox.session_id, kind=Artifact.Kind.LOG),
        }
        return TemplateResponse(request, "admin/sandboxes/sandbox/logs.html", context)

    @admin.action(description="Open logs", permissions=["view"])
    def open_logs(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> HttpResponse | None:
        sandboxes = list(queryset[:2])
        if len(sandboxes) != 1:
            self.message_user(request, "Select exactly one sandbox to open its logs.", messages.WARNING)
            return None
        return HttpResponseRedirect(logs_url(sandboxes[0]))

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


def logs_url(sandbox: Sandbox) -> str:
    return reverse("admin:sandboxes_sandbox_logs", args=[sandbox.pk])

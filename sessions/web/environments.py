"""Environment pages: the list, the new form and the edit form.

Django renders the forms; the API's ``EnvironmentSerializer`` validates them. The page only turns what
a browser can send (``KEY=value`` lines, one row per secret) into the API's request body, so the page
and the API accept and refuse the same input with the same words, and the errors land at the field
(or the secret row) they name. Secret values travel one way: into the serializer, never back into a
page, not even after a validation error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_safe
from rest_framework.exceptions import PermissionDenied as ApiPermissionDenied
from rest_framework.exceptions import ValidationError

from sessions.api.permissions import can_write, readable_teams, team_for_write, writable_teams
from sessions.api.serializers import EnvironmentSerializer
from sessions.models import AgentProfile, Environment
from sessions.web.forms import model_options

# The serializer's writable fields except secrets, which the page edits in a section of its own:
# the page and the API cannot drift apart.
FIELDS = tuple(
    name
    for name in EnvironmentSerializer.Meta.fields
    if name not in ("id", "secrets", *EnvironmentSerializer.Meta.read_only_fields)
)
NULLABLE = ("cpu_limit", "memory_mb", "idle_ttl_seconds", "default_profile")  # empty: no limit / the default
NEW_SECRET_ROWS = 2
MAX_NEW_SECRET_ROWS = 20
RETYPE = "Secret values are never shown again: type the ones you entered once more."


def short_duration(seconds: int) -> str:
    """``5400`` -> ``1h 30m``: limits are round numbers, so only the parts that are there."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(p for p in parts if not p.startswith("0") or len(parts) == 1)


def text_input(**attrs: str) -> forms.TextInput:
    return forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false", **attrs})


class EnvironmentForm(forms.Form):
    """Every field is optional text here, so the only rules are the serializer's."""

    name = forms.CharField(required=False, widget=text_input(placeholder="python-3.12"))
    team = forms.CharField(required=False, widget=forms.Select)
    image = forms.CharField(
        required=False,
        widget=text_input(placeholder="python:3.12-slim"),
        help_text="Container image for the docker sandbox provider.",
    )
    setup_script = forms.CharField(
        required=False,
        strip=False,
        label="Setup script",
        widget=forms.Textarea(attrs={"rows": 5, "class": "mono", "spellcheck": "false"}),
        help_text="Shell commands run (sh) in each new sandbox, before the repository's .deputies/setup.",
    )
    env_vars = forms.CharField(
        required=False,
        strip=False,
        label="Environment variables",
        widget=forms.Textarea(
            attrs={"rows": 4, "class": "mono", "spellcheck": "false", "placeholder": "LOG_LEVEL=debug"}
        ),
        help_text="One KEY=value per line. Not secret: every team member can read them; put "
        "credentials in Secrets below. Blank lines and lines starting with # are skipped.",
    )
    sandbox_provider = forms.CharField(required=False, label="Sandbox provider", widget=forms.Select)
    network_policy = forms.CharField(
        required=False,
        label="Network",
        widget=forms.Select(
            choices=[("none", "none: no network in the sandbox"), ("bridge", "bridge: network access")]
        ),
    )
    cpu_limit = forms.CharField(
        required=False,
        label="CPU limit",
        widget=text_input(inputmode="decimal", placeholder="no limit"),
        help_text="CPUs, e.g. 1.5. Empty: no limit.",
    )
    memory_mb = forms.CharField(
        required=False,
        label="Memory (MB)",
        widget=text_input(inputmode="numeric", placeholder="no limit"),
        help_text="Empty: no limit.",
    )
    timeout_seconds = forms.CharField(
        required=False,
        label="Timeout (seconds)",
        widget=text_input(inputmode="numeric"),
        help_text="How long one run may take.",
    )
    idle_ttl_seconds = forms.CharField(
        required=False,
        label="Idle TTL (seconds)",
        widget=text_input(inputmode="numeric", placeholder="deployment default"),
    )
    default_model = forms.CharField(
        required=False, label="Default model", widget=text_input(list="model-options")
    )
    default_profile = forms.CharField(
        required=False,
        label="Default agent profile",
        widget=forms.Select,
        help_text="For sessions in this environment that name none. Empty: the team's default.",
    )

    def __init__(self, data=None, *, user, environment: Environment | None = None) -> None:
        super().__init__(data, initial=initial_for(environment))
        self.environment = environment
        self.env_vars_text = self.initial.get("env_vars", "")
        if environment is None:
            self.teams = list(writable_teams(user).order_by("name"))
            self.show_team = len(self.teams) > 1
            self.fields["team"].widget.choices = [("", "— choose a team —")] + [
                (t.slug, t.name) for t in self.teams
            ]
            if len(self.teams) == 1:
                self.initial["team"] = self.teams[0].slug
            scope = self.teams
        else:
            del self.fields["team"]
            self.show_team = False
            scope = [environment.team]
        default = settings.SANDBOX_PROVIDER
        self.fields["sandbox_provider"].widget.choices = [
            ("", f"deployment default ({default})"),
            ("local", "local"),
            ("docker", "docker"),
        ]
        chosen = (environment.sandbox_provider if environment else "") or default
        self.unenforced = network_unenforced()
        self.fields["network_policy"].help_text = network_hint(chosen, self.unenforced)
        self.fields["network_policy"].widget.attrs["data-unenforced"] = json.dumps(self.unenforced)
        self.fields["network_policy"].widget.attrs["data-default-provider"] = default
        self.fields["idle_ttl_seconds"].help_text = (
            "Destroy a session's sandbox after this long unused. Empty: the deployment default "
            f"({short_duration(settings.SANDBOX_IDLE_TTL)})."
        )
        self.fields["default_model"].help_text = (
            "provider/model for sessions that name none. Configured providers: "
            + (", ".join(sorted(settings.LLM_PROVIDERS)) or "none")
        )
        self.model_options = model_options(Environment.objects.filter(team__in=scope))
        profiles = (
            AgentProfile.objects.filter(team__in=scope).select_related("team").order_by("team__name", "name")
        )
        self.fields["default_profile"].widget.choices = [("", "none (the team's default)")] + [
            (str(p.pk), f"{p.name} ({p.team.name})" if len(scope) > 1 else p.name) for p in profiles
        ]
        self.secret_rows = existing_rows(environment, self.data if self.is_bound else None)
        self.new_rows = new_rows(self.data if self.is_bound else None)
        self.secret_errors: list[str] = []
        self.api_data: dict[str, Any] = {}

    # --- from the page to the API's request body ---------------------------------------------------

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        data: dict[str, Any] = {name: cleaned.get(name, "") for name in FIELDS if name in self.fields}
        for name in ("setup_script", "env_vars"):  # browsers send textarea lines with CRLF
            data[name] = data[name].replace("\r\n", "\n")
        for name in NULLABLE:
            data[name] = data[name].strip() or None
        if not data.get("team"):
            data.pop("team", None)
        text = data.pop("env_vars")
        if self.environment is None or text != self.env_vars_text:  # unchanged: keep it as it is
            env_vars, problems = parse_env_lines(text)
            if problems:
                self.add_error("env_vars", problems)
            else:
                data["env_vars"] = env_vars
        if changes := self.secret_changes():
            data["secrets"] = changes
        self.api_data = data
        return cleaned

    def secret_changes(self) -> dict[str, dict[str, Any] | None]:
        changes: dict[str, dict[str, Any] | None] = {}
        for row in self.secret_rows:
            if not row.shown:  # added by someone else since this page was rendered: not ours to touch
                continue
            if row.remove:
                changes[row.name] = None
                continue
            change: dict[str, Any] = {}
            if row.value:
                change = {"value": row.value, "sandbox_visible": row.sandbox_visible}
            elif row.sandbox_visible != row.stored_visible:
                change = {"sandbox_visible": row.sandbox_visible}
            if change:
                changes[row.name] = change
        existing = {row.name for row in self.secret_rows}
        for row in self.new_rows:
            if not row.name and not row.value:
                continue
            if not row.name:
                row.errors.append("Give this secret a name.")
            elif row.name in existing:
                row.errors.append(f"{row.name} already exists: replace its value above.")
            elif row.name in changes:
                row.errors.append(f"{row.name} is given twice.")
            else:
                change = {"sandbox_visible": row.sandbox_visible}
                if row.value:
                    change["value"] = row.value
                changes[row.name] = change
        return changes

    # --- errors -------------------------------------------------------------------------------------

    def add_api_errors(self, errors: Any) -> None:
        """Put the serializer's (or the permission check's) words where they belong."""
        if not isinstance(errors, dict):
            self.add_error(None, [str(e) for e in errors] if isinstance(errors, list) else str(errors))
            return
        for name, texts in errors.items():
            if name == "secrets":
                self.add_secret_errors(texts)
            elif name in self.fields and (name != "team" or self.show_team):
                self.add_error(name, as_texts(texts))
            elif name in ("non_field_errors", "team"):
                self.add_error(None, as_texts(texts))
            else:
                self.add_error(None, [f"{name}: {t}" for t in as_texts(texts)])

    def add_secret_errors(self, errors: Any) -> None:
        if not isinstance(errors, dict):
            self.secret_errors += as_texts(errors)
            return
        rows = {row.name: row for row in self.secret_rows} | {r.name: r for r in self.new_rows if r.name}
        for name, texts in errors.items():
            if name in rows:
                rows[name].errors += as_texts(texts)
            else:
                self.secret_errors += [f"{name}: {t}" for t in as_texts(texts)]

    @property
    def has_errors(self) -> bool:
        rows = self.secret_rows + self.new_rows
        return bool(self.errors or self.secret_errors or any(row.errors for row in rows))

    @property
    def has_field_errors(self) -> bool:
        rows = self.secret_rows + self.new_rows
        fields = any(name != NON_FIELD_ERRORS for name in self.errors)
        return fields or bool(self.secret_errors) or any(row.errors for row in rows)

    @property
    def values_typed(self) -> bool:
        return any(row.value for row in self.secret_rows + self.new_rows)

    def forget_values(self) -> None:
        """Drop every typed value before the page is rendered again."""
        for row in self.secret_rows + self.new_rows:
            row.value = ""


def as_texts(messages_: Any) -> list[str]:
    return [str(m) for m in messages_] if isinstance(messages_, list) else [str(messages_)]


def initial_for(environment: Environment | None) -> dict[str, Any]:
    if environment is None:
        timeout = Environment._meta.get_field("timeout_seconds").default
        return {"network_policy": Environment.Network.NONE, "timeout_seconds": str(timeout)}
    initial = {
        name: "" if getattr(environment, name) is None else str(getattr(environment, name))
        for name in FIELDS
        if name not in ("team", "env_vars", "default_profile")
    }
    initial["default_profile"] = str(environment.default_profile_id or "")
    initial["env_vars"] = "\n".join(f"{key}={value}" for key, value in environment.env_vars.items())
    return initial


def parse_env_lines(text: str) -> tuple[dict[str, str], list[str]]:
    """``KEY=value`` lines to the API's ``env_vars`` object; the serializer judges the names."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"Line {number}: expected KEY=value.")
        elif key in lines:
            problems.append(f"Line {number}: {key} is already set on line {lines[key]}.")
        else:
            values[key], lines[key] = value, number
    return values, problems


# --- secret rows -----------------------------------------------------------------------------------


@dataclass
class SecretRow:
    """One row of the secrets section. ``value`` holds what was typed, only until the form is saved
    or rendered again (``forget_values``)."""

    prefix: str
    name: str = ""
    value: str = ""
    sandbox_visible: bool = False
    stored_visible: bool = False
    shown: bool = False
    remove: bool = False
    updated: Any = None
    errors: list[str] = field(default_factory=list)


def existing_rows(environment: Environment | None, data) -> list[SecretRow]:
    if environment is None:
        return []
    rows = []
    for secret in environment.secrets.all():
        prefix = f"secret-{secret.name}"
        row = SecretRow(
            prefix,
            name=secret.name,
            sandbox_visible=secret.sandbox_visible,
            stored_visible=secret.sandbox_visible,
            updated=secret.updated,
        )
        if data is not None and data.get(f"{prefix}-shown"):
            row.shown = True
            row.value = data.get(f"{prefix}-value", "")
            row.sandbox_visible = bool(data.get(f"{prefix}-visible"))
            row.remove = bool(data.get(f"{prefix}-remove"))
        rows.append(row)
    return rows


def new_rows(data) -> list[SecretRow]:
    count = NEW_SECRET_ROWS
    if data is not None and str(data.get("new-count", "")).isdigit():
        count = min(max(int(data["new-count"]), 1), MAX_NEW_SECRET_ROWS)
    rows = []
    for index in range(1, count + 1):
        row = SecretRow(f"new-{index}")
        if data is not None:
            row.name = data.get(f"{row.prefix}-name", "").strip()
            row.value = data.get(f"{row.prefix}-value", "")
            row.sandbox_visible = bool(data.get(f"{row.prefix}-visible"))
        rows.append(row)
    return rows


# --- saving ----------------------------------------------------------------------------------------


def save_from_form(request: HttpRequest, form: EnvironmentForm) -> Environment | None:
    """Create or edit the environment the form describes, or put the reasons on the form."""
    form.is_valid()  # page-level problems (lines, rows); the serializer still checks the rest
    environment = form.environment
    data = form.api_data
    if environment is not None and request.POST.get("revision") != str(environment.revision):
        form.add_error(
            None,
            f"Someone saved revision {environment.revision} of this environment after you opened it. "
            "Nothing was saved: check the fields below (they hold your edits) and save again to "
            "replace their version.",
        )
    context: dict[str, Any] = {"request": request}
    if environment is None:
        try:
            context["team"] = team_for_write(request.user, data.get("team"))
        except ValidationError as exc:
            form.add_api_errors(exc.detail)
            return None
        except ApiPermissionDenied as exc:
            form.add_error(None, str(exc.detail))
            return None
        serializer = EnvironmentSerializer(data=data, context=context)
    else:
        serializer = EnvironmentSerializer(environment, data=data, partial=True, context=context)
    if not serializer.is_valid():
        form.add_api_errors(serializer.errors)
    if form.has_errors:
        return None
    if environment is not None and not changes_anything(environment, serializer.validated_data):
        return environment
    try:
        return serializer.save()
    except ValidationError as exc:  # a name taken by a concurrent request
        form.add_api_errors(exc.detail)
        return None


def changes_anything(environment: Environment, validated: dict[str, Any]) -> bool:
    if validated.get("secrets"):
        return True
    return any(getattr(environment, name) != value for name, value in validated.items() if name != "secrets")


# --- views -----------------------------------------------------------------------------------------


def visible_environments(user) -> QuerySet[Environment]:
    queryset = Environment.objects.select_related("team")
    return queryset if user.is_staff else queryset.filter(team__in=readable_teams(user))


def limits_text(environment: Environment) -> str:
    cpu = f"{environment.cpu_limit:g} CPU" if environment.cpu_limit is not None else "any CPU"
    memory = f"{environment.memory_mb} MB" if environment.memory_mb is not None else "any memory"
    return f"{cpu} · {memory} · {short_duration(environment.timeout_seconds)} per run"


def idle_ttl_text(environment: Environment) -> str:
    if environment.idle_ttl_seconds is None:
        return f"default ({short_duration(settings.SANDBOX_IDLE_TTL)})"
    return short_duration(environment.idle_ttl_seconds)


def describe(environment: Environment) -> Environment:
    environment.limits_text = limits_text(environment)
    environment.idle_ttl_text = idle_ttl_text(environment)
    environment.provider_text = environment.sandbox_provider or f"default ({settings.SANDBOX_PROVIDER})"
    return environment


@require_safe
@login_required
def environment_list(request: HttpRequest) -> HttpResponse:
    environments = (
        visible_environments(request.user)
        .annotate(secret_count=Count("secrets"))
        .order_by("team__name", "name", "pk")
    )
    return render(
        request,
        "sessions/environments.html",
        {
            "environments": [describe(e) for e in environments],
            "can_create": writable_teams(request.user).exists(),
        },
    )


def render_form(request: HttpRequest, form: EnvironmentForm, status: int = 200, **extra) -> HttpResponse:
    retype = form.is_bound and form.values_typed
    form.forget_values()
    environment = form.environment
    return render(
        request,
        "sessions/environment_form.html",
        {
            "form": form,
            "environment": describe(environment) if environment else None,
            "can_write": True,
            "new_count": len(form.new_rows),
            "retype": RETYPE if retype else "",
            **extra,
        },
        status=status,
    )


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def environment_new(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        form = EnvironmentForm(user=request.user)
        return render_form(request, form, read_only=not form.teams)
    if not writable_teams(request.user).exists():
        raise PermissionDenied(
            "You have read-only (viewer) access; creating an environment needs owner or member."
        )
    form = EnvironmentForm(request.POST, user=request.user)
    environment = save_from_form(request, form)
    if environment is None:
        return render_form(request, form, status=400)
    messages.success(request, f"Environment {environment.name} created (revision {environment.revision}).")
    return redirect("environment-detail", pk=environment.pk)


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def environment_detail(request: HttpRequest, pk: int) -> HttpResponse:
    environment = get_object_or_404(visible_environments(request.user).prefetch_related("secrets"), pk=pk)
    writable = can_write(request.user, environment.team_id)
    if request.method != "POST":
        if not writable:
            return render(
                request,
                "sessions/environment_form.html",
                {"environment": describe(environment), "can_write": False},
            )
        return render_form(request, EnvironmentForm(user=request.user, environment=environment))
    if not writable:
        raise PermissionDenied(
            f"You have read-only (viewer) access to team {environment.team.name}; "
            "editing an environment needs owner or member."
        )
    before = environment.revision
    form = EnvironmentForm(request.POST, user=request.user, environment=environment)
    saved = save_from_form(request, form)
    if saved is None:
        environment.refresh_from_db()
        form.environment = environment
        return render_form(request, form, status=400)
    if saved.revision == before:
        messages.info(request, f"Nothing changed; still revision {saved.revision}.")
    else:
        messages.success(request, f"Saved as revision {saved.revision}.")
    return redirect("environment-detail", pk=saved.pk)


def network_unenforced() -> dict[str, str]:
    """Sandbox providers that cannot enforce a network policy on this host, with the reason: the
    form says so next to the field rather than letting "none" look like a promise."""
    from sandboxes.base import SandboxError, get_provider

    reasons = {}
    for name in ("local", "docker"):
        try:
            caps = get_provider(name).capabilities()
        except SandboxError as exc:
            reasons[name] = str(exc)
            continue
        if not caps.network_policy:
            reasons[name] = caps.reason or "it has no network isolation here"
    return reasons


def network_hint(provider: str, unenforced: dict[str, str]) -> str:
    if provider in unenforced:
        return (
            f"Not enforced: the {provider} provider cannot restrict the network on this host "
            f"({unenforced[provider]}); sandbox commands reach the network whatever is chosen."
        )
    return f"Enforced by the {provider} provider."

"""The new-session form: Django renders it, the API's serializer validates it.

Every field is a plain optional text field here, so the only rules are the serializer's
(``SessionCreateSerializer``): the page and the API accept and refuse the same input, with the same
words, and the errors land at the field they name.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.db import transaction
from rest_framework.exceptions import PermissionDenied, ValidationError

from sessions.api.permissions import as_id, readable_teams, team_for_write, writable_teams
from sessions.api.serializers import SessionCreateSerializer
from sessions.models import AgentProfile, Environment, Repository, Session, Source

FIELDS = ("team", "repository", "repository_url", "base_branch", "environment", "profile", "model", "prompt")


class NewSessionForm(forms.Form):
    team = forms.CharField(required=False, widget=forms.Select)
    repository = forms.CharField(required=False, widget=forms.Select)
    repository_url = forms.CharField(
        required=False,
        label="…or a clone URL",
        widget=forms.TextInput(
            attrs={"placeholder": "https://github.com/acme/widgets.git", "inputmode": "url"}
        ),
    )
    base_branch = forms.CharField(
        required=False, widget=forms.TextInput(attrs={"placeholder": "the repository's default branch"})
    )
    environment = forms.CharField(required=False, widget=forms.Select)
    profile = forms.CharField(
        required=False,
        label="Agent profile",
        widget=forms.Select,
        help_text="Tools, skills, step limit and budget; its model applies when the model is left empty.",
    )
    model = forms.CharField(required=False, widget=forms.TextInput(attrs={"list": "model-options"}))
    prompt = forms.CharField(
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 8, "placeholder": "What should the agent do?"}),
    )

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teams = list(writable_teams(user).order_by("name"))
        several = len(self.teams) > 1
        self.fields["team"].widget.choices = [("", "— choose a team —")] + [
            (t.slug, t.name) for t in self.teams
        ]
        repositories = Repository.objects.filter(team__in=self.teams).select_related("team").order_by("name")
        environments = Environment.objects.filter(team__in=self.teams).select_related("team").order_by("name")
        self.fields["repository"].widget.choices = [("", "— choose a repository —")] + [
            (str(r.pk), f"{r.name} ({r.team.name})" if several else r.name) for r in repositories
        ]
        self.fields["environment"].widget.choices = [("", "none (deployment defaults)")] + [
            (str(e.pk), f"{e.name} ({e.team.name})" if several else e.name) for e in environments
        ]
        profiles = AgentProfile.objects.filter(team__in=self.teams).select_related("team").order_by("name")
        self.fields["profile"].widget.choices = [("", "default (the environment's, else the team's)")] + [
            (str(p.pk), f"{p.name} ({p.team.name})" if several else p.name) for p in profiles
        ]
        self.has_profiles = bool(profiles)
        self.has_repositories = bool(repositories)
        if repositories and all(r.provider == "local" for r in repositories):
            # Teams that only work on local checkouts are not shown a GitHub address as the example.
            self.fields["repository_url"].widget.attrs["placeholder"] = "/path/to/a/git/repository"
        self.show_team = several
        self.model_options = model_options(environments)
        self.fields["model"].help_text = "provider/model. Configured providers: " + (
            ", ".join(sorted(settings.LLM_PROVIDERS)) or "none"
        )
        if not self.is_bound:
            self.initial.setdefault("model", settings.DEFAULT_MODEL)
            if len(self.teams) == 1:
                self.initial.setdefault("team", self.teams[0].slug)


def model_options(environments) -> list[str]:
    options = [settings.DEFAULT_MODEL] if settings.DEFAULT_MODEL else []
    options += [e.default_model for e in environments if e.default_model]
    options += [f"{name}/" for name in sorted(settings.LLM_PROVIDERS)]
    return list(dict.fromkeys(options))


def serializer_data(form: NewSessionForm) -> dict[str, Any]:
    data: dict[str, Any] = {name: form.cleaned_data.get(name, "") for name in FIELDS}
    for name in ("repository", "environment"):  # ids: empty means "not given"
        data[name] = data[name] or None
    if not data["team"]:
        data.pop("team")
    return data


def start_from_form(request, form: NewSessionForm) -> Session | None:
    """Start the session the form describes, or put the reasons on the form's fields."""
    if not form.is_valid():
        return None
    data = serializer_data(form)
    try:
        team = team_for_write(request.user, data.get("team"), hint=_team_of(request.user, data["repository"]))
    except ValidationError as exc:
        _add_errors(form, exc.detail)
        return None
    except PermissionDenied as exc:
        form.add_error(None, str(exc.detail))
        return None
    serializer = SessionCreateSerializer(data=data, context={"team": team, "request": request})
    if not serializer.is_valid():
        _add_errors(form, serializer.errors)
        return None
    with transaction.atomic():
        session = serializer.save()
        # The serializer starts API sessions; this one came from the browser.
        Session.objects.filter(pk=session.pk).update(source=Source.WEB)
        session.source = Source.WEB
    return session


def _team_of(user, value: Any):
    """A new session goes to its repository's team unless the form names one (as in the API)."""
    if (pk := as_id(value)) is None:
        return None
    repository = (
        Repository.objects.filter(pk=pk, team__in=readable_teams(user)).select_related("team").first()
    )
    return repository.team if repository else None


def _add_errors(form: forms.Form, errors: Any) -> None:
    if not isinstance(errors, dict):
        form.add_error(None, [str(e) for e in errors] if isinstance(errors, list) else str(errors))
        return
    for name, messages in errors.items():
        field = name if name in form.fields else None
        texts = [str(m) for m in messages] if isinstance(messages, list) else [str(messages)]
        form.add_error(field, texts)

"""The skills page: the team's and your own markdown instructions for agents, listed and edited.

Writes go through the API serializer (sessions/api/agent_serializers.py), so the page and the API
accept and refuse the same things.
"""

from __future__ import annotations

from types import SimpleNamespace

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from sessions.api.agent_serializers import SkillSerializer
from sessions.api.permissions import can_write, readable_teams, writable_teams
from sessions.models import Skill


class SkillForm(forms.Form):
    team = forms.ModelChoiceField(queryset=None, empty_label=None)
    name = forms.CharField(
        max_length=64, help_text="Lower-case letters, digits, - and _; the model loads it by this name."
    )
    description = forms.CharField(
        max_length=300, help_text="One line: when should the agent load this skill?"
    )
    body = forms.CharField(widget=forms.Textarea(attrs={"rows": 14}), help_text="Markdown instructions.")
    personal = forms.BooleanField(required=False, help_text="Only your own sessions see a personal skill.")

    def __init__(self, *args, user, skill: Skill | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user, self.skill = user, skill
        self.fields["team"].queryset = writable_teams(user)
        if skill is not None:
            self.fields["team"].disabled = self.fields["personal"].disabled = True
            self.initial.update(
                team=skill.team_id,
                name=skill.name,
                description=skill.description,
                body=skill.body,
                personal=skill.owner_id is not None,
            )

    def save(self) -> Skill | None:
        """Through the API's serializer; its errors land on the form's fields."""
        if not self.is_valid():
            return None
        data = {k: self.cleaned_data[k] for k in ("name", "description", "body")}
        request = SimpleNamespace(user=self.user)  # the serializer only asks who is writing
        if self.skill is None:
            data["personal"] = self.cleaned_data["personal"]
            serializer = SkillSerializer(
                data=data, context={"team": self.cleaned_data["team"], "request": request}
            )
        else:
            serializer = SkillSerializer(self.skill, data=data, partial=True, context={"request": request})
        if not serializer.is_valid():
            for field, errors in serializer.errors.items():
                self.add_error(field if field in self.fields else None, [str(e) for e in errors])
            return None
        return serializer.save()


def visible_skills(user) -> QuerySet[Skill]:
    queryset = Skill.objects.select_related("team", "owner").filter(Q(owner__isnull=True) | Q(owner=user))
    return queryset if user.is_staff else queryset.filter(team__in=readable_teams(user))


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def skill_list(request: HttpRequest) -> HttpResponse:
    form = None
    if writable_teams(request.user).exists():
        form = SkillForm(request.POST or None, user=request.user)
        if request.method == "POST":
            skill = form.save()
            if skill is not None:
                messages.success(request, f"Skill {skill.name} created.")
                return redirect("skill-list")
    elif request.method == "POST":
        raise PermissionDenied("You have read-only (viewer) access; adding a skill needs owner or member.")
    skills = visible_skills(request.user).order_by("team__name", "name", "pk")
    status = 400 if form is not None and form.errors else 200
    return render(request, "sessions/skills.html", {"skills": skills, "form": form}, status=status)


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def skill_detail(request: HttpRequest, pk: int) -> HttpResponse:
    skill = get_object_or_404(visible_skills(request.user), pk=pk)
    writable = can_write(request.user, skill.team_id)
    form = SkillForm(request.POST or None, user=request.user, skill=skill) if writable else None
    if request.method == "POST":
        if form is None:
            raise PermissionDenied(
                "You have read-only (viewer) access; editing a skill needs owner or member."
            )
        saved = form.save()
        if saved is not None:
            messages.success(request, f"Saved as revision {saved.revision}.")
            return redirect("skill-detail", pk=saved.pk)
    status = 400 if form is not None and form.errors else 200
    return render(request, "sessions/skill_form.html", {"skill": skill, "form": form}, status=status)


@require_POST
@login_required
def skill_delete(request: HttpRequest, pk: int) -> HttpResponse:
    skill = get_object_or_404(visible_skills(request.user), pk=pk)
    if not can_write(request.user, skill.team_id):
        raise PermissionDenied("You have read-only (viewer) access; deleting a skill needs owner or member.")
    skill.delete()
    messages.success(request, f"Skill {skill.name} deleted.")
    return redirect("skill-list")

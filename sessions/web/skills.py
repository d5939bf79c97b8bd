"""The skills page: the team's and your own markdown instructions for agents, listed and edited.

Writes go through the API serializer (sessions/api/agent_serializers.py), so the page and the API
accept and refuse the same things.
"""

from __future__ import annotations

from django import forms
from django.db.models import Q, QuerySet

from sessions.api.agent_serializers import SkillSerializer
from sessions.api.permissions import readable_teams, writable_teams
from sessions.models import Skill
from sessions.web.team_pages import TeamPages, save_through


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

    def __init__(self, *args, user, instance: Skill | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user, self.skill = user, instance
        self.fields["team"].queryset = writable_teams(user)
        if instance is not None:
            self.fields["team"].disabled = self.fields["personal"].disabled = True
            self.initial.update(
                team=instance.team_id,
                name=instance.name,
                description=instance.description,
                body=instance.body,
                personal=instance.owner_id is not None,
            )

    def save(self) -> Skill | None:
        if not self.is_valid():
            return None
        data = {k: self.cleaned_data[k] for k in ("name", "description", "body")}
        if self.skill is None:
            data["personal"] = self.cleaned_data["personal"]
        return save_through(self, SkillSerializer, self.skill, data, team=self.cleaned_data["team"])


def visible_skills(user) -> QuerySet[Skill]:
    queryset = Skill.objects.select_related("team", "owner").filter(Q(owner__isnull=True) | Q(owner=user))
    return queryset if user.is_staff else queryset.filter(team__in=readable_teams(user))


class SkillPages(TeamPages):
    noun = "skill"
    form_class = SkillForm
    list_template, detail_template = "sessions/skills.html", "sessions/skill_form.html"
    list_url, detail_url = "skill-list", "skill-detail"
    list_name, object_name = "skills", "skill"

    def visible(self, user) -> QuerySet[Skill]:
        return visible_skills(user).order_by("team__name", "name", "pk")

    def saved_message(self, obj: Skill) -> str:
        return f"Saved as revision {obj.revision}."


pages = SkillPages()

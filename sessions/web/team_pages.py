"""The pages of something a team owns and edits in one form (skills, MCP servers): a list with a
form to add one, a page per object with a form to edit it, and a delete button. Viewers read,
outsiders get a 404, and writes go through the API's serializer (``save_through``), so a page and
the API accept and refuse the same things.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.decorators import method_decorator
from django.views.decorators.http import require_http_methods, require_POST

from sessions.api.permissions import can_write, writable_teams


def save_through(form: forms.Form, serializer_class: type, instance: Model | None, data: dict, team=None):
    """Save ``data`` with the API's serializer (a create into ``team``, or a partial update of
    ``instance``); its errors land on the form's fields. None when it refused."""
    context: dict[str, Any] = {"request": SimpleNamespace(user=form.user)}  # it only asks who writes
    if instance is None:
        serializer = serializer_class(data=data, context={**context, "team": team})
    else:
        serializer = serializer_class(instance, data=data, partial=True, context=context)
    if not serializer.is_valid():
        for field, errors in serializer.errors.items():
            form.add_error(field if field in form.fields else None, flat_messages(errors))
        return None
    return serializer.save()


def flat_messages(errors: Any) -> list[str]:
    """A serializer's messages for one field, flat; nested ones are prefixed with their key."""
    if isinstance(errors, dict):
        return [f"{key}: {m}" for key, value in errors.items() for m in flat_messages(value)]
    return [str(e) for e in errors]


class TeamPages:
    """Subclasses name the model's words, form, templates and URL names."""

    noun = ""  # "skill": in messages and the read-only refusals
    article = "a"
    form_class: type[forms.Form]
    list_template = ""
    detail_template = ""
    list_url = ""
    detail_url = ""
    list_name = "objects"  # the list's name in the list template
    object_name = "object"  # the object's name in the detail template

    def visible(self, user) -> QuerySet:
        raise NotImplementedError

    def list_context(self, request: HttpRequest) -> dict[str, Any]:
        return {}

    def created_message(self, obj: Model) -> str:
        return f"{self.noun[:1].upper()}{self.noun[1:]} {obj.name} created."

    def saved_message(self, obj: Model) -> str:
        return f"{self.noun[:1].upper()}{self.noun[1:]} {obj.name} saved."

    def read_only(self, verb: str) -> PermissionDenied:
        return PermissionDenied(
            f"You have read-only (viewer) access; {verb} {self.article} {self.noun} needs owner or member."
        )

    @method_decorator(require_http_methods(["GET", "HEAD", "POST"]))
    @method_decorator(login_required)
    def list(self, request: HttpRequest) -> HttpResponse:
        form = None
        if writable_teams(request.user).exists():
            form = self.form_class(request.POST or None, user=request.user)
            if request.method == "POST":
                obj = form.save()
                if obj is not None:
                    messages.success(request, self.created_message(obj))
                    return redirect(self.list_url)
        elif request.method == "POST":
            raise self.read_only("adding")
        context = {self.list_name: self.visible(request.user), "form": form, **self.list_context(request)}
        status = 400 if form is not None and form.errors else 200
        return render(request, self.list_template, context, status=status)

    @method_decorator(require_http_methods(["GET", "HEAD", "POST"]))
    @method_decorator(login_required)
    def detail(self, request: HttpRequest, pk: int) -> HttpResponse:
        obj = get_object_or_404(self.visible(request.user), pk=pk)
        writable = can_write(request.user, obj.team_id)
        form = self.form_class(request.POST or None, user=request.user, instance=obj) if writable else None
        if request.method == "POST":
            if form is None:
                raise self.read_only("editing")
            saved = form.save()
            if saved is not None:
                messages.success(request, self.saved_message(saved))
                return redirect(self.detail_url, pk=saved.pk)
        status = 400 if form is not None and form.errors else 200
        return render(request, self.detail_template, {self.object_name: obj, "form": form}, status=status)

    @method_decorator(require_POST)
    @method_decorator(login_required)
    def delete(self, request: HttpRequest, pk: int) -> HttpResponse:
        obj = get_object_or_404(self.visible(request.user), pk=pk)
        if not can_write(request.user, obj.team_id):
            raise self.read_only("deleting")
        obj.delete()
        messages.success(request, f"{self.noun[:1].upper()}{self.noun[1:]} {obj.name} deleted.")
        return redirect(self.list_url)

from __future__ import annotations

from django.urls import path

from integrations.github import views

urlpatterns = [
    path("webhook", views.webhook_view, name="github-webhook"),
]

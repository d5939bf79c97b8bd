from __future__ import annotations

from django.urls import path

from integrations.webhooks import views

urlpatterns = [
    path("<slug:slug>", views.receive_view, name="webhook-receive"),
]

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from deputies.metrics import metrics

# An oversized body read by middleware (the CSRF check of a page's form) becomes a 413 there.
handler400 = "sessions.api.errors.bad_request"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("favicon.ico", RedirectView.as_view(url=static("deputies/favicon.svg"), permanent=True)),
    path("login", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    path("metrics", metrics, name="metrics"),
    path("integrations/webhooks/", include("integrations.webhooks.urls")),
    path("integrations/slack/", include("integrations.slack.urls")),
    path("", include("integrations.deliveries.urls")),  # before the API's catch-all 404
    path("", include("sessions.api.urls")),
    path("", include("sessions.web.urls")),
]

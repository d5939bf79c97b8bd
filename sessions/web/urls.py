from __future__ import annotations

from django.urls import path

from sessions.web import automations, environments, mcp_servers, skills, views

urlpatterns = [
    path("", views.session_list, name="session-list"),
    path("sessions/new", views.session_new, name="session-new"),
    path("sessions/<int:pk>", views.session_detail, name="session-detail"),
    path("sessions/<int:pk>/messages", views.session_message, name="session-message"),
    path(
        "sessions/<int:pk>/messages/<int:message_id>",
        views.session_message_change,
        name="session-message-change",
    ),
    path("sessions/<int:pk>/cancel", views.session_cancel, name="session-cancel"),
    path("sessions/<int:pk>/archive", views.session_archive, name="session-archive"),
    path("sessions/<int:pk>/diff", views.session_diff, name="session-diff"),
    path("environments", environments.environment_list, name="environment-list"),
    path("environments/new", environments.environment_new, name="environment-new"),
    path("environments/<int:pk>", environments.environment_detail, name="environment-detail"),
    path("skills", skills.pages.list, name="skill-list"),
    path("skills/<int:pk>", skills.pages.detail, name="skill-detail"),
    path("skills/<int:pk>/delete", skills.pages.delete, name="skill-delete"),
    path("mcp-servers", mcp_servers.pages.list, name="mcp-server-list"),
    path("mcp-servers/<int:pk>", mcp_servers.pages.detail, name="mcp-server-detail"),
    path("mcp-servers/<int:pk>/delete", mcp_servers.pages.delete, name="mcp-server-delete"),
    path("automations", automations.automation_list, name="automation-list"),
    path("automations/<int:pk>/toggle", automations.automation_toggle, name="automation-toggle"),
    path("sessions/<int:pk>/scheduled", automations.session_schedule_followup, name="session-schedule"),
    path("usage", views.usage, name="usage"),
    path("setup", views.setup_status, name="setup"),
]

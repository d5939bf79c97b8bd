"""Websocket routes (the HTTP ones are in urls.py). The protocol is described in sessions/consumers.py."""

from __future__ import annotations

from django.urls import re_path

from sessions.consumers import SessionEventsConsumer, SessionListConsumer

websocket_urlpatterns = [
    re_path(r"^ws/sessions/(?P<session_id>[0-9]+)/?$", SessionEventsConsumer.as_asgi()),
    re_path(r"^ws/sessions/?$", SessionListConsumer.as_asgi()),
]

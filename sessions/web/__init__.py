"""The browser dashboard: server-rendered pages, with small JS modules under ``static/`` for live updates.

Pages reuse the API's team scoping (``sessions.api.permissions``), querysets and serializers, so the
rules for who sees what and what a valid new session is live in one place.
"""

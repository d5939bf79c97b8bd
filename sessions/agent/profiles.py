"""Agent profiles at run time: which profile a session works under, and what it changes.

The profile is decided when the session is created (``start_session``: the one asked for, else the
environment's default, else the team's) and kept on the session, so editing a team's default later
does not change sessions already running. What it shapes at run time: the tools offered and the
system prompt (sessions/agent/toolset.py), the step limit (the loop), and the summary model
(sessions/agent/titles.py). Its model and budget are applied when the session is created.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings


def profile_of(session: Any) -> Any:
    return session.profile if getattr(session, "profile_id", None) else None


def summary_model(session: Any) -> str:
    """The cheaper model for titles and summaries: the profile's, else DEPUTIES_SUMMARY_MODEL."""
    profile = profile_of(session)
    return (profile.summary_model if profile is not None else "") or settings.SUMMARY_MODEL


def default_profile(team: Any, environment: Any = None) -> Any:
    """The profile a new session gets when it names none."""
    return (environment.default_profile if environment is not None else None) or team.default_profile

"""Queue entry points for sandboxes: a few lines each."""

from __future__ import annotations


def reap_sandboxes() -> str:
    """Scheduled every few minutes (see the migration that creates the Schedule)."""
    from sandboxes.reaper import reap

    return str(reap())

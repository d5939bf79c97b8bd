"""Signals other apps listen to; sessions never imports them (integrations connect receivers).

``run_finished`` is sent inside the transaction that ends a run (completed, failed, cancelled,
timed out, or failed for good by lease recovery), once per run: whatever a receiver writes commits
or rolls back with the run's end. Keyword arguments: ``run_id``, ``session_id``, ``status`` (the
run's final status), ``error`` and ``source`` (the session's ``Source``: a receiver for one kind of
session skips the others without a query).
"""

from __future__ import annotations

from django.dispatch import Signal

run_finished = Signal()
# Sent inside the transaction that claims a run, with its ``run_started`` event. Keyword arguments:
# ``run_id``, ``session_id``, ``attempt`` and ``source`` (the session's, or None when the claim did
# not load the session). A receiver must not raise: the claim would be rolled back.
run_started = Signal()

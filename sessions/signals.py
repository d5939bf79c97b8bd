"""Signals other apps listen to; sessions never imports them (integrations connect receivers).

``run_finished`` is sent inside the transaction that ends a run (completed, failed, cancelled,
timed out, or failed for good by lease recovery), once per run: whatever a receiver writes commits
or rolls back with the run's end. Keyword arguments: ``run_id``, ``session_id``, ``status`` (the
run's final status), ``error``, ``source`` (the session's ``Source``: a receiver for one kind of
session skips the others without a query) and maybe ``checks`` (``finish_checks`` below).
"""

from __future__ import annotations

from django.dispatch import Signal

run_finished = Signal()
# Questions a ``run_finished`` receiver asks of every run's end, answered in a statement the end
# runs anyway (on Postgres, when it emits events): name -> SQL of one boolean, with the
# placeholder ``%(finish_session)s`` for the session's id. The answers come as ``checks`` (name ->
# bool; absent when the end asked nothing: the receiver then asks itself).
finish_checks: dict[str, str] = {}
# Sent inside the transaction that claims a run, with its ``run_started`` event. Keyword arguments:
# ``run_id``, ``session_id``, ``attempt`` and ``source`` (the session's, or None when the claim did
# not load the session). A receiver must not raise: the claim would be rolled back.
run_started = Signal()

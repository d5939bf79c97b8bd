"""Live session events over websockets. The rows are the truth; everything here is a notification.

- ``notify``: runs after an emit() commits, in whichever process emitted; one message per emit()
  (``pg_notify``, a Redis ``PUBLISH``, or a local hand-off in poll mode).
- ``hub``: one listener per web process and an in-process fan-out to the websocket consumers
  (``sessions/consumers.py``), so N subscribers cost one notification, not N channel-layer sends.
- ``store``: frames and the database reads behind replay, gap filling and the session list.

A consumer's only state is its cursor (the last seq it sent). Whatever it is told, it sends only
``seq == cursor + 1`` next and reads any gap from the database, which is what makes "reconnect with
?after=<last seq>" lose nothing and repeat nothing.
"""

from __future__ import annotations

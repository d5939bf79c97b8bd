"""Durable outbound deliveries: the one path every integration uses to send something out.

Public interface (``integrations.deliveries.services``; the module docstring there has the details):

* ``enqueue(*, session, kind, target, payload, idempotency_key, event="", run=None,
  subscription=None, max_attempts=None) -> Delivery``: call it inside your transaction; the worker's
  queue sends it after commit (never a request), with retries, and every attempt is logged as a
  ``DeliveryAttempt``. The same ``(kind, idempotency_key)`` returns the first delivery.
* ``subscribe(session, url, secret, *, label="") -> CallbackSubscription``: HTTP callbacks for the
  ends of the session's runs (``run.completed`` / ``run.failed`` / ``run.cancelled``), signed with
  ``secret`` (stored encrypted). Check the URL with ``deputies.netguard.check_url`` first; the address
  is checked again when connecting.
* ``wake(queryset) -> ids``: pending deliveries that waited for something (Slack: the thread's first
  message) become due now. ``session`` may be None for an answer that belongs to no session.
* ``replay(delivery) -> Delivery``: send an ended delivery again (same payload, same idempotency key).
* A new kind (Slack, GitHub): a ``senders.Sender`` subclass with ``kind`` and ``send(delivery,
  attempt) -> Outcome``, decorated with ``senders.register`` and imported by its app's ``ready()``;
  and a receiver of ``sessions.signals.run_finished`` that calls ``enqueue``.

Every HTTP attempt carries ``X-Deputies-Delivery: <id>`` (the same on every retry; receivers
deduplicate by it), ``X-Deputies-Idempotency-Key`` (shared by a delivery and its replays) and
``X-Deputies-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`` (README: verifying one).
"""

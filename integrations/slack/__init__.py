"""Slack: delegate work from a channel (``/deputy``, ``@Deputies``), follow it in the thread, steer it
from there. Inbound over HTTP (views.py) or Socket Mode (socket_mode.py), both into handler.py; outbound
only as deliveries of kind ``slack`` (outbound.py); the thread is bound to its session through
``sessions.SessionBinding``. Settings: ``DEPUTIES_SLACK_*`` (README)."""

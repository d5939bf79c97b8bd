"""The Socket Mode transport, for a Deputies with no public URL (most self-hosted installs): slack-sdk's
built-in ``SocketModeClient`` opens the websocket (``apps.connections.open`` with the app token),
and every envelope goes to handler.py, the code the HTTP endpoints use. Acknowledged after the
handler's transaction commits (a slash command's ack carries its ephemeral answer); an envelope
whose handling failed is not acknowledged, so Slack sends it again, and the dedupe table keeps that
harmless.

Runs inside ``deputies worker`` (a few threads) when ``DEPUTIES_SLACK_APP_TOKEN`` is set, or alone
as ``deputies slack``. Several workers hold several connections; Slack gives each envelope to one.
"""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.db import close_old_connections

from integrations.slack import client, handler

log = logging.getLogger(__name__)


def on_request(socket_client, request) -> None:
    from slack_sdk.socket_mode.response import SocketModeResponse

    close_old_connections()
    try:
        payload = request.payload or {}
        if request.type == "events_api":
            answer = handler.handle_event(payload, retry_num=request.retry_attempt)
            ack = None
        elif request.type == "slash_commands":
            answer = handler.handle_command({k: str(v) for k, v in payload.items()})
            ack = answer.body
        elif request.type == "interactive":
            answer = handler.handle_interaction(payload)
            ack = None
        else:
            answer, ack = None, None
        log.debug("slack socket mode %s: %s", request.type, answer.note if answer else "ignored")
    except Exception:
        log.exception("slack: handling a Socket Mode %s envelope failed; not acknowledged", request.type)
        return
    finally:
        close_old_connections()
    socket_client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id, payload=ack))


def make_client():
    from slack_sdk.socket_mode.builtin import SocketModeClient

    socket_client = SocketModeClient(
        app_token=settings.SLACK_APP_TOKEN,
        web_client=client.web_client(token=""),
        logger=logging.getLogger("integrations.slack.socket_mode"),
        concurrency=4,
    )
    socket_client.socket_mode_request_listeners.append(on_request)
    return socket_client


def start():
    """Connect and return the client (its own threads read and answer), or None when not configured."""
    if not settings.SLACK_APP_TOKEN:
        return None
    socket_client = make_client()
    socket_client.connect()
    log.info("slack: Socket Mode connected")
    return socket_client


def start_in_worker():
    """``deputies worker``'s hook: Socket Mode beside the runs when configured; a failure to connect
    is logged and retried by the client, never stops the worker."""
    if not (settings.SLACK_APP_TOKEN and settings.SLACK_SOCKET_MODE_IN_WORKER):
        return None
    try:
        return start()
    except Exception:
        log.exception("slack: Socket Mode could not connect (the worker goes on without it)")
        return None


def serve(stop: threading.Event) -> int:
    """``deputies slack``: Socket Mode in the foreground until ``stop``."""
    socket_client = start()
    if socket_client is None:
        raise RuntimeError("DEPUTIES_SLACK_APP_TOKEN is not set (Socket Mode needs an app-level token).")
    try:
        stop.wait()
    finally:
        socket_client.close()
    return 0

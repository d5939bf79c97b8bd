"""The Socket Mode transport, for a Deputies with no public URL (most self-hosted installs): slack-sdk's
built-in ``SocketModeClient`` opens the websocket (``apps.connections.open`` with the app token),
and every envelope goes to handler.py, the code the HTTP endpoints use. Acknowledged after the
handler's transaction commits (a slash command's ack carries its ephemeral answer); an envelope
whose handling failed is not acknowledged, so Slack sends it again, and the dedupe table keeps that
harmless.

Runs inside ``deputies worker`` (a few threads; it keeps trying to connect while Slack is away) when
``DEPUTIES_SLACK_APP_TOKEN`` is set, or alone as ``deputies slack``. Several workers hold several connections; Slack gives each envelope to one.
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
    try:
        socket_client.connect()
    except BaseException:
        socket_client.close()  # its reader threads are running already
        raise
    log.info("slack: Socket Mode connected")
    return socket_client


class Background:
    """Socket Mode on its own thread (beside a worker's runs, or in ``deputies slack``): connects,
    retrying with back-off while Slack or the network is away; once connected, the client
    reconnects by itself."""

    def __init__(self) -> None:
        self.client = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._connect, name="slack-socket-mode", daemon=True)
        self.thread.start()

    def _connect(self) -> None:
        delay = 1.0
        while not self.stopped.is_set():
            try:
                self.client = start()
                return
            except Exception as exc:  # a bad token, Slack away: the worker goes on, we try again
                log.warning("slack: Socket Mode could not connect (%s); retrying in %.0f s", _why(exc), delay)
            self.stopped.wait(delay)
            delay = min(60.0, delay * 2)

    def close(self) -> None:
        self.stopped.set()
        if self.client is not None:
            self.client.close()


def _why(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is not None and isinstance(getattr(response, "data", None), dict):
        return f"Slack answered {response.data.get('error')}"
    return type(exc).__name__


def start_in_worker() -> Background | None:
    """``deputies worker``'s hook, when an app token is set and DEPUTIES_SLACK_SOCKET_MODE_IN_WORKER."""
    if not (settings.SLACK_APP_TOKEN and settings.SLACK_SOCKET_MODE_IN_WORKER):
        return None
    return Background()


def serve(stop: threading.Event) -> int:
    """``deputies slack``: Socket Mode until ``stop``."""
    if not settings.SLACK_APP_TOKEN:
        raise RuntimeError("DEPUTIES_SLACK_APP_TOKEN is not set (Socket Mode needs an app-level token).")
    background = Background()
    try:
        stop.wait()
    finally:
        background.close()
    return 0

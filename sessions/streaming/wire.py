"""The two shortcuts that make 100 subscribers cheap under daphne, both measured with bench/stream.py.

1. ``SessionAuthMiddleware`` sets ``scope["user"]`` from the Django session cookie once, at connect.
   channels' ``AuthMiddlewareStack`` does the same but also wraps ``send`` for the life of the
   connection (to save a modified session, which these sockets never do): about a fifth of the CPU
   spent per pushed frame.

2. ``direct_writer``: the frame of an event is the same bytes for every subscriber (server frames are
   not masked), so it is built once and written straight to each subscriber's socket, instead of
   going through channels -> daphne -> autobahn -> Twisted's write buffer (an epoll change to wait
   for writability, a send on the next loop turn, another epoll change) for every subscriber. On
   the benchmark machine that is ~16-20 instead of ~35-45 us of daphne CPU per frame, and the
   frames leave during the fan-out instead of a loop turn later. It applies only when ``send`` is
   daphne's own (``partial(Server.handle_reply, protocol)``) with an open, uncompressed autobahn
   protocol over a plain TCP connection; anything else (another server, TLS terminated in daphne, the test
   communicator, ``STREAM_DIRECT_WRITE=False``) gets ``None`` or Twisted's ``transport.write``,
   and the consumer uses ASGI ``send`` as usual. Bytes go to the kernel directly only while
   Twisted's buffer is empty, else they queue behind it, so all paths can be mixed on one socket
   and still arrive in call order. It leans on daphne, autobahn and Twisted internals (checked
   here, falling back when they differ): re-run bench/stream.py when upgrading them.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from importlib import import_module
from types import SimpleNamespace

from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator
from django.conf import settings
from django.contrib import auth
from django.contrib.auth.models import AnonymousUser
from django.http.cookie import parse_cookie

Writer = Callable[[bytes], bool]


def frame_bytes(text: str) -> bytes:
    """A complete, final, unmasked websocket text frame (RFC 6455, section 5.2)."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


def direct_writer(send) -> Writer | None:
    if not settings.STREAM_DIRECT_WRITE:
        return None
    if not isinstance(send, functools.partial) or len(send.args) != 1:
        return None
    try:
        from daphne.ws_protocol import WebSocketProtocol
        from twisted.internet.tcp import Connection
    except ImportError:
        return None
    protocol = send.args[0]
    if (
        not isinstance(protocol, WebSocketProtocol)
        or getattr(protocol, "_perMessageCompress", None) is not None
        or not hasattr(protocol, "send_queue")
    ):
        return None
    transport = getattr(protocol, "transport", None)
    # Plain TCP only: with TLS in daphne the bytes must go through Twisted's TLS layer.
    plain = (
        isinstance(transport, Connection)
        and not getattr(transport, "TLS", True)
        and all(hasattr(transport, a) for a in ("_writeDisconnected", "_tempDataLen", "dataBuffer", "offset"))
    )
    sock_send = transport.socket.send if plain else None
    open_state = protocol.STATE_OPEN

    def write(data: bytes) -> bool:
        if protocol.state != open_state:
            return False  # closing or closed: nothing more goes out, as with daphne's own send
        if protocol.send_queue:
            protocol.sendData(data)  # autobahn has queued writes of its own: stay behind them
            return True
        if (
            sock_send is not None
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataLen
            and len(transport.dataBuffer) == transport.offset
        ):
            # Nothing buffered: hand the bytes to the kernel now rather than registering for
            # writability and sending on the next loop turn (two epoll changes per frame).
            try:
                sent = sock_send(data)
            except OSError:  # BlockingIOError included; any other error Twisted meets on its write
                sent = 0
            if sent == len(data):
                return True
            data = data[sent:]
        transport.write(data)
        return True

    return write


class SessionAuthMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            scope = {**scope, "user": await user_for(scope)}
        return await self.app(scope, receive, send)


def authorization_header(scope) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            return value
    return None


class WebsocketAuth:
    """``Authorization: Bearer <token>`` on the handshake (API clients, ``deputies run``), else the
    session cookie behind the origin check (browsers).

    The origin check exists because browsers attach cookies to cross-site websockets; they cannot
    attach an Authorization header, so a socket that brings one needs no origin (CLI clients send
    none). A bad or unknown token gets the same 4401 as no login. No query-string or subprotocol
    form is offered: a token in a URL ends up in access logs, and browsers have the cookie.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.browser = AllowedHostsOriginValidator(SessionAuthMiddleware(app))

    async def __call__(self, scope, receive, send):
        header = authorization_header(scope) if scope["type"] == "websocket" else None
        if header is None:
            return await self.browser(scope, receive, send)
        scope = {**scope, "user": await user_for_bearer(header)}
        return await self.app(scope, receive, send)


@database_sync_to_async
def user_for_bearer(header: bytes) -> object:
    from sessions.api.auth import bearer_secret, token_for

    secret = bearer_secret(header)
    token = token_for(secret) if secret else None
    return token.user if token is not None else AnonymousUser()


@database_sync_to_async
def user_for(scope) -> object:
    cookies: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        if name.lower() == b"cookie":
            cookies.update(parse_cookie(value.decode("latin-1")))
    key = cookies.get(settings.SESSION_COOKIE_NAME)
    if not key:
        return AnonymousUser()
    store = import_module(settings.SESSION_ENGINE).SessionStore(key)
    # get_user checks the session's auth hash, so a changed password logs the socket out too.
    return auth.get_user(SimpleNamespace(session=store))

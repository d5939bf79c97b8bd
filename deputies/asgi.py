from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deputies.settings")

import django  # noqa: E402

django.setup(set_prefix=False)

from deputies.asgi_handler import PooledASGIHandler  # noqa: E402

django_asgi_app = PooledASGIHandler()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from deputies.routing import websocket_urlpatterns  # noqa: E402
from sessions.streaming.wire import WebsocketAuth  # noqa: E402

http_app = django_asgi_app
if settings.SERVE_STATIC:
    # Simple mode has no reverse proxy in front; daphne serves /static/ itself.
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(django_asgi_app)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        # A bearer token on the handshake (API clients), or the session cookie behind the origin
        # check, which stops another site's page from opening a stream as the logged-in user; see
        # WebsocketAuth and SessionAuthMiddleware (channels' AuthMiddlewareStack without its
        # per-message cost) in sessions/streaming/wire.py.
        "websocket": WebsocketAuth(URLRouter(websocket_urlpatterns)),
    }
)

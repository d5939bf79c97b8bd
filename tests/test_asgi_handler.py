"""deputies/asgi_handler.py serves a request in one hop to its thread: the request's signals still
fire once each, on the view's thread, and streaming responses are sent and closed as Django does."""

from __future__ import annotations

import asyncio
import threading

import pytest
from django.core import signals
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import path

from deputies.asgi_handler import PooledASGIHandler

seen: list[tuple[str, str]] = []


def plain(request):
    seen.append(("view", threading.current_thread().name))
    return HttpResponse(b"plain body", status=201)


def stream(request):
    seen.append(("view", threading.current_thread().name))

    async def chunks():
        for chunk in (b"one ", b"two ", b"three"):
            yield chunk

    return StreamingHttpResponse(chunks())


def endless(request):
    async def chunks():  # a sync iterator would be read whole before sending (Django's ASGI rule)
        while True:
            yield b"x" * 100
            await asyncio.sleep(0)

    return StreamingHttpResponse(chunks())


urlpatterns = [path("plain", plain), path("stream", stream), path("endless", endless)]


@pytest.fixture
def signals_seen(settings):
    settings.ROOT_URLCONF = __name__
    settings.ALLOWED_HOSTS = ["*"]
    seen.clear()

    def started(**kwargs):
        seen.append(("started", threading.current_thread().name))

    def finished(**kwargs):
        seen.append(("finished", threading.current_thread().name))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    yield seen
    signals.request_started.disconnect(started)
    signals.request_finished.disconnect(finished)


def scope(path_: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/{path_}",
        "raw_path": f"/{path_}".encode(),
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


async def serve(path_: str, disconnect: asyncio.Event | None = None) -> list[dict]:
    sent: list[dict] = []
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await (disconnect.wait() if disconnect else asyncio.Event().wait())
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if disconnect is not None and len(sent) >= 5:
            disconnect.set()

    await asyncio.wait_for(PooledASGIHandler()(scope(path_), receive, send), timeout=30)
    return sent


def body_of(sent: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.asyncio
async def test_a_plain_response_fires_each_signal_once_on_the_views_thread(signals_seen):
    sent = await serve("plain")
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 201
    assert body_of(sent) == b"plain body"
    assert [what for what, _ in signals_seen] == ["started", "view", "finished"]
    assert len({thread for _, thread in signals_seen}) == 1  # one request thread for all three
    assert signals_seen[0][1] != threading.current_thread().name


@pytest.mark.asyncio
async def test_a_streaming_response_is_sent_whole_then_closed(signals_seen):
    sent = await serve("stream")
    assert sent[0]["status"] == 200
    assert body_of(sent) == b"one two three"
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)
    assert [what for what, _ in signals_seen] == ["started", "view", "finished"]


@pytest.mark.asyncio
async def test_a_client_leaving_an_endless_stream_ends_it(signals_seen):
    sent = await serve("endless", disconnect=asyncio.Event())
    assert len(sent) >= 5 and sent[0]["status"] == 200
    assert [what for what, _ in signals_seen] == ["started", "finished"]

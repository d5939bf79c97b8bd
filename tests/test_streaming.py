"""The pieces under the consumers: notification messages, frames on the wire, cursors, cookie auth."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import Client
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from sessions.consumers import parse_after
from sessions.models import Event, Repository, Session
from sessions.streaming import store
from sessions.streaming.notify import LIMITS, encode
from sessions.streaming.wire import frame_bytes, user_for


def parse_frame(data: bytes) -> Frame:
    """Parse with the websockets library, as a client would (server frames are not masked)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None)
    try:
        next(parser)
    except StopIteration as done:
        return done.value
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_it_frames_text_exactly_as_a_websocket_client_reads_it(size):
    text = "é" * (size // 2) + "x" * (size % 2)
    frame = parse_frame(frame_bytes(text))
    assert (frame.opcode, frame.fin, frame.data.decode()) == (Opcode.TEXT, True, text)


def make_events(session_id: int, sizes: list[int]) -> list[Event]:
    return [
        Event(session_id=session_id, seq=i + 1, type="assistant_text", payload={"text": "x" * n})
        for i, n in enumerate(sizes)
    ]


def test_it_sends_the_events_in_the_notification_when_they_fit():
    from django.utils import timezone

    events = make_events(7, [10, 20])
    for e in events:
        e.created = timezone.now()
    message = json.loads(encode(events, LIMITS["postgres"]))
    assert (message["s"], message["m"], message["n"]) == (7, 2, 2)
    assert [e["payload"]["text"] for e in message["e"]] == ["x" * 10, "x" * 20]


def test_it_sends_only_the_range_when_the_events_do_not_fit_a_postgres_notify():
    from django.utils import timezone

    events = make_events(7, [4000, 4000])
    for e in events:
        e.created = timezone.now()
    text = encode(events, LIMITS["postgres"])
    assert json.loads(text) == {"s": 7, "m": 2, "n": 2}
    assert len(encode(events, LIMITS["redis"])) > 8000  # Redis carries them


@pytest.mark.parametrize(
    ("query", "after"),
    [
        (b"", 0),
        (b"after=12", 12),
        (b"after=-3", 0),
        (b"after=abc", 0),
        (b"x=1&after=4", 4),
        (b"after=" + b"9" * 30, 2**63 - 1),
    ],
)
def test_it_reads_the_cursor_from_the_query_string(query, after):
    assert parse_after(query) == after


@pytest.mark.django_db
def test_it_builds_the_same_frame_from_a_row_as_from_a_notification(team):
    from sessions.events import emit

    repo = Repository.objects.create(team=team, name="r", url="/tmp/none")
    session = Session.objects.create(team=team, repository=repo, base_branch="main", model="m")
    event = emit(session.pk, "tool_finished", {"name": "bash", "ok": True, "output": "é", "n": 1.5})
    from_notification = json.loads(encode([event], LIMITS["postgres"]))["e"][0]
    ((seq, text),) = store.read_event_frames(session.pk, 0)
    assert seq == 1
    assert json.loads(text) == json.loads(store.event_frame(from_notification))


@pytest.mark.django_db(transaction=True)  # database_sync_to_async closes the connection it ran on
def test_it_authenticates_a_socket_by_its_session_cookie_and_forgets_it_when_the_password_changes(owner):
    from asgiref.sync import async_to_sync

    browser = Client()
    browser.force_login(owner)
    cookie = f"sessionid={browser.cookies['sessionid'].value}; other=1".encode()
    scope = {"type": "websocket", "headers": [(b"cookie", cookie)]}
    assert async_to_sync(user_for)(scope) == owner
    owner.set_password("a new one")
    owner.save()
    assert isinstance(async_to_sync(user_for)(scope), AnonymousUser)
    assert isinstance(async_to_sync(user_for)({"type": "websocket", "headers": []}), AnonymousUser)


def read_frames(sock, count: int) -> list[str]:
    """Read exactly ``count`` frames from ``sock`` (blocking, with a deadline) as their texts."""
    sock.settimeout(5)
    data, texts = b"", []
    while len(texts) < count:
        data += sock.recv(65536)
        while len(data) >= 2 and len(data) >= 2 + (data[1] & 0x7F):  # frames here are < 126 bytes
            end = 2 + (data[1] & 0x7F)
            frame = parse_frame(data[:end])
            texts.append(frame.data.decode())
            data = data[end:]
    sock.setblocking(False)
    try:
        extra = sock.recv(65536)
    except BlockingIOError:
        extra = b""
    assert extra == b"", f"more was written than expected: {extra!r}"
    return texts


def test_a_caught_up_subscriber_writes_each_event_once_in_order_straight_to_its_socket():
    """The hub's hot path: ``push`` writes a note's frames past the cursor in one write, skips what
    the subscriber has, and queues what does not continue its cursor (for the pump to read)."""
    import asyncio
    import socket

    from sessions.consumers import SessionEventsConsumer
    from sessions.streaming.hub import Note, framed

    ours, theirs = socket.socketpair()
    writes: list[bytes] = []

    def write(data: bytes) -> bool:  # the shape of wire.direct_writer's writer, on a real socket
        writes.append(data)
        ours.sendall(data)
        return True

    def note(*seqs: int) -> Note:
        return Note(seqs[-1], tuple(framed(seq, f'{{"seq":{seq}}}') for seq in seqs))

    async def scenario() -> SessionEventsConsumer:
        consumer = SessionEventsConsumer()
        consumer.cursor, consumer.busy, consumer.queue, consumer.writer = 2, False, asyncio.Queue(), write
        consumer.push(note(3))  # caught up: written as is
        consumer.push(note(2, 3, 4, 5))  # overlaps what it has: only 4 and 5, in one write
        consumer.push(note(5))  # old news
        consumer.push(note(7))  # a gap: queued for the pump, nothing written
        return consumer

    try:
        consumer = asyncio.run(scenario())
        assert read_frames(theirs, 3) == ['{"seq":3}', '{"seq":4}', '{"seq":5}']
        assert len(writes) == 2
        assert consumer.cursor == 5
        assert consumer.queue.qsize() == 1
    finally:
        ours.close()
        theirs.close()

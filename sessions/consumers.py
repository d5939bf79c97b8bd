"""Websocket consumers: they check access, replay from the rows, then forward what the hub hears.

Protocol (the pages code against it):

- ``/ws/sessions/<id>/?after=<seq>``: ``{"type": "event", "event": {seq, type, payload, created,
  run}}`` frames, strictly increasing in seq, none skipped, none repeated; first the stored events
  after ``after``, then new ones as they are written.
- ``/ws/sessions/``: ``{"type": "session", "session": {id, status, title, updated, cost_usd,
  input_tokens, output_tokens}}`` whenever a session of one of the user's teams (every team for
  staff) gets a ``status`` or ``usage`` event.
- Either way ``{"type": "ping"}`` is answered with ``{"type": "pong"}``.

Anonymous users are closed with 4401; a session that does not exist or is not theirs with 4404
(the same, so nobody learns which ids exist).
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from sessions.api.permissions import MAX_ID, as_id
from sessions.streaming import store
from sessions.streaming.hub import Hub, Note, get_hub
from sessions.streaming.wire import Writer, direct_writer, frame_bytes

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_INTERNAL_ERROR = 1011
PONG = store.dumps({"type": "pong"})
_CATCH_UP = Note(max_seq=MAX_ID)  # "read whatever the database has past the cursor"


def parse_after(query_string: bytes) -> int:
    values = parse_qs(query_string.decode("latin-1")).get("after") or ["0"]
    return min(int(values[-1]), MAX_ID) if values[-1].isdigit() else 0


class _Consumer(AsyncWebsocketConsumer):
    # Fed by the streaming hub, not by a channel layer: an unconfigured alias means none is created.
    channel_layer_alias = "streaming-hub"

    hub: Hub | None = None
    pump: asyncio.Task | None = None

    async def refuse(self, code: int) -> None:
        # Accept first: a close before the handshake becomes an HTTP 403 and the code is lost.
        await self.accept()
        await self.close(code)

    async def authenticated(self) -> bool:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.refuse(CLOSE_UNAUTHENTICATED)
            return False
        return True

    async def receive(self, text_data=None, bytes_data=None) -> None:
        try:
            message = json.loads(text_data or bytes_data or b"")
        except ValueError:
            return
        if isinstance(message, dict) and message.get("type") == "ping":
            await self.send(text_data=PONG)

    def start_pump(self, queue: asyncio.Queue) -> None:
        self.pump = asyncio.get_running_loop().create_task(self._run_pump(queue))

    async def _run_pump(self, queue: asyncio.Queue) -> None:
        try:
            await self.forward(queue)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The client reconnects with its last seq and loses nothing; keep the socket honest.
            log.exception("websocket stream of %s failed", self.scope.get("path"))
            await self.close(CLOSE_INTERNAL_ERROR)

    async def forward(self, queue: asyncio.Queue) -> None:
        raise NotImplementedError

    async def disconnect(self, code) -> None:
        self.unsubscribe()
        if self.pump is not None:
            self.pump.cancel()

    def unsubscribe(self) -> None:
        pass


class SessionEventsConsumer(_Consumer):
    """State: ``cursor``, the last seq sent. Only ``cursor + 1`` may go out next; a gap is read from
    the database. Notes arrive through ``push``: a caught-up consumer writes them at once (the hot
    path, no task switch), otherwise they wait in ``queue`` for the pump, which sends in order."""

    session_id: int
    cursor: int = 0
    queue: asyncio.Queue | None = None
    writer: Writer | None = None
    busy = True  # the pump is working (replay, gap): pushes must queue behind it

    async def connect(self) -> None:
        if not await self.authenticated():
            return
        session_id = as_id(self.scope["url_route"]["kwargs"]["session_id"])
        if not await database_sync_to_async(store.can_read_session)(self.scope["user"], session_id):
            await self.refuse(CLOSE_NOT_FOUND)
            return
        self.session_id = session_id
        self.cursor = parse_after(self.scope.get("query_string", b""))
        await self.accept()
        self.writer = direct_writer(self.base_send)
        self.hub = get_hub()
        self.queue = asyncio.Queue()
        self.queue.put_nowait(_CATCH_UP)  # replay first; notes from the hub queue up behind it
        await self.hub.subscribe_session(session_id, self)
        self.start_pump(self.queue)

    def unsubscribe(self) -> None:
        if self.hub is not None and self.queue is not None:
            self.hub.unsubscribe_session(self.session_id, self)

    def push(self, note: Note) -> None:
        # Called for every subscriber of every note: kept to a few attribute reads and one write.
        cursor = self.cursor
        if note.max_seq <= cursor:
            return
        write = self.writer
        if write is None or self.busy or self.queue.qsize() or not self._continues(note):
            self.queue.put_nowait(note)
            return
        if note.frames[0][0] == cursor + 1:
            data = note.data  # the usual case: the subscriber is exactly caught up
        else:
            data = b"".join(frame for seq, _, frame in note.frames if seq > cursor)
        if write(data):  # one send for a batch
            self.cursor = note.max_seq
        # else the socket is closing; the disconnect handler cleans up

    def _continues(self, note: Note) -> bool:
        return (
            bool(note.frames) and note.frames[0][0] <= self.cursor + 1 and note.frames[-1][0] == note.max_seq
        )

    async def forward(self, queue: asyncio.Queue) -> None:
        while True:
            self.busy = False
            note: Note = await queue.get()
            self.busy = True
            if note.max_seq <= self.cursor:
                continue
            if self._continues(note):
                await self.send_frames([(seq, text) for seq, text, _ in note.frames if seq > self.cursor])
                continue
            await self.catch_up()

    async def send_frames(self, frames: list[tuple[int, str]]) -> None:
        if not frames:
            return
        if self.writer is not None:
            self.writer(b"".join(frame_bytes(text) for _, text in frames))
        else:
            for _, text in frames:
                await self.send(text_data=text)
        self.cursor = frames[-1][0]

    async def catch_up(self) -> None:
        """Everything the database has past the cursor, page by page (a gap, a replay, a resync)."""
        while True:
            frames = await database_sync_to_async(store.read_event_frames)(self.session_id, self.cursor)
            await self.send_frames(frames)
            if len(frames) < store.PAGE:
                return


class SessionListConsumer(_Consumer):
    queue: asyncio.Queue | None = None

    async def connect(self) -> None:
        if not await self.authenticated():
            return
        teams = await database_sync_to_async(store.readable_team_ids)(self.scope["user"])
        self.hub = get_hub()
        self.queue = asyncio.Queue()
        # Listening before the client learns it is connected: a change it makes right after the
        # handshake is announced (at its commit, which can be that soon) and must not be missed.
        await self.hub.subscribe_list(self.queue, teams)
        await self.accept()
        self.start_pump(self.queue)

    def unsubscribe(self) -> None:
        if self.hub is not None and self.queue is not None:
            self.hub.unsubscribe_list(self.queue)

    async def forward(self, queue: asyncio.Queue) -> None:
        while True:
            await self.send(text_data=await queue.get())

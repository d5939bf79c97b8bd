"""A loopback Slack for tests: the Web API (``POST /api/<method>``, what slack-sdk's ``WebClient`` speaks
with ``base_url`` pointed here) recording every call, able to answer 429 with ``Retry-After`` or 500s
for a while; and a Socket Mode websocket server (``apps.connections.open`` returns its ``ws://`` URL)
that pushes envelopes to the real ``SocketModeClient`` and records its acks. Plus ``signed()``: a
request signed exactly as Slack signs one (v0 HMAC-SHA256 of ``v0:<ts>:<body>``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

SIGNING_SECRET = "slack-test-signing-secret"
BOT_TOKEN = "xoxb-test-bot-token"
APP_TOKEN = "xapp-test-app-token"
TEAM_ID = "T0TEST"
CHANNEL_ID = "C0DEV"
BOT_USER = "U0BOT"


def signed(body: bytes, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={mac}"}


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.tokens: list[str] = []
        self.users: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.down = False  # every call answers 500 while True
        self.limited: list[float] = []  # the next calls answer 429 with these Retry-After values
        self.attempts = 0
        self._ts = 0
        self.socket: FakeSocketMode | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                method = self.path.rsplit("/", 1)[-1]
                if "json" in (self.headers.get("Content-Type") or ""):
                    params = json.loads(raw or b"{}")
                else:
                    params = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                status, headers, body = fake.answer(method, params, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeSlack:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.socket is not None:
            self.socket.close()

    def add_user(self, user_id: str, email: str, confirmed: bool = True) -> None:
        self.users[user_id] = {"id": user_id, "is_email_confirmed": confirmed, "profile": {"email": email}}

    def answer(self, method: str, params: dict[str, Any], auth: str) -> tuple[int, dict, dict]:
        with self.lock:
            self.attempts += 1
            if self.down:
                return 500, {}, {"ok": False, "error": "fatal_error"}
            if self.limited and method != "apps.connections.open":
                return 429, {"Retry-After": str(self.limited.pop(0))}, {"ok": False, "error": "ratelimited"}
            self.calls.append((method, params))
            self.tokens.append(auth)
            if method == "apps.connections.open":
                assert self.socket is not None, "no Socket Mode server attached"
                return 200, {}, {"ok": True, "url": self.socket.url}
            if method == "users.info":
                user = self.users.get(params.get("user", ""))
                return (
                    200,
                    {},
                    ({"ok": True, "user": user} if user else {"ok": False, "error": "user_not_found"}),
                )
            if method == "chat.postMessage":
                self._ts += 1
                return (
                    200,
                    {},
                    {"ok": True, "channel": params.get("channel"), "ts": f"1700000000.{self._ts:06d}"},
                )
            return 200, {}, {"ok": True}

    # --- what a test asks -----------------------------------------------------------------------

    def of(self, *methods: str) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return [(m, p) for m, p in self.calls if m in methods]

    def reactions(self) -> list[str]:
        """``+eyes``, ``-hourglass_flowing_sand``, ... in the order Slack got them."""
        return [("-" if m == "reactions.remove" else "+") + p["name"]
                for m, p in self.of("reactions.add", "reactions.remove")]  # fmt: skip

    def texts(self, method: str = "chat.postMessage") -> list[str]:
        return [p.get("text", "") for _, p in self.of(method)]


class FakeSocketMode:
    """A Socket Mode endpoint: one client connection at a time; ``push`` sends an envelope and
    ``ack_for`` waits for the client's acknowledgement of it."""

    def __init__(self, slack: FakeSlack) -> None:
        from websockets.sync.server import serve

        self.acks: dict[str, dict[str, Any]] = {}
        self.connections: list = []
        self.cond = threading.Condition()
        slack.socket = self

        def handler(ws) -> None:
            with self.cond:
                self.connections.append(ws)
                self.cond.notify_all()
            ws.send(
                json.dumps({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0TEST"}})
            )
            try:
                for message in ws:
                    data = json.loads(message)
                    if "envelope_id" in data:
                        with self.cond:
                            self.acks[data["envelope_id"]] = data
                            self.cond.notify_all()
            except Exception:  # noqa: BLE001 - the client went away
                pass
            finally:
                with self.cond:
                    if ws in self.connections:
                        self.connections.remove(ws)

        self.server = serve(handler, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}/link/?ticket=test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()

    def wait_connected(self, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.connections, timeout), (
                "the Socket Mode client never connected"
            )

    def push(self, kind: str, payload: dict[str, Any], retry_attempt: int = 0) -> str:
        envelope_id = str(uuid.uuid4())
        envelope = {"envelope_id": envelope_id, "type": kind, "payload": payload,
                    "accepts_response_payload": kind != "events_api", "retry_attempt": retry_attempt,
                    "retry_reason": "timeout" if retry_attempt else ""}  # fmt: skip
        self.wait_connected()
        with self.cond:
            ws = self.connections[-1]
        ws.send(json.dumps(envelope))
        return envelope_id

    def ack_for(self, envelope_id: str, timeout: float = 10) -> dict[str, Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: envelope_id in self.acks, timeout), f"no ack for {envelope_id}"
            return self.acks[envelope_id]


def command_form(
    text: str, user: str = "U0ALICE", trigger: str | None = None, channel: str = CHANNEL_ID
) -> dict:
    return {"token": "unused", "team_id": TEAM_ID, "team_domain": "test", "channel_id": channel,
            "channel_name": "dev", "user_id": user, "user_name": user.lower(), "command": "/deputy",
            "text": text, "api_app_id": "A0TEST", "response_url": "https://hooks.slack.invalid/x",
            "trigger_id": trigger or uuid.uuid4().hex}  # fmt: skip


def event_body(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {"token": "unused", "team_id": TEAM_ID, "api_app_id": "A0TEST", "type": "event_callback",
            "event_id": event_id or "Ev" + uuid.uuid4().hex[:10].upper(), "event_time": int(time.time()),
            "event": {"channel": CHANNEL_ID, "event_ts": event.get("ts"), **event},
            "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER, "is_bot": True}]}  # fmt: skip


def action_payload(action_id: str, session_id: int, user: str = "U0ALICE") -> dict[str, Any]:
    return {"type": "block_actions", "team": {"id": TEAM_ID}, "user": {"id": user},
            "channel": {"id": CHANNEL_ID}, "trigger_id": uuid.uuid4().hex,
            "actions": [{"action_id": action_id, "value": str(session_id), "type": "button",
                         "action_ts": str(time.time())}]}  # fmt: skip

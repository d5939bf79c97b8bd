"""A real HTTP receiver on 127.0.0.1 for callback tests and the deliveries bench.

It answers each request from a script of behaviours, in order (the last one repeats), and records
what it was sent (headers, raw body, arrival time). Behaviours:

* ``200``, ``500``, ``404``, ... : that status, a short body;
* ``"429:2"``: 429 with ``Retry-After: 2``; ``"503:date:1"``: 503 with an HTTP-date one second ahead;
* ``"drop"``: read the request, then close the connection without an answer;
* ``"hold"``: keep the request open until ``release()`` (then 200; the client may be gone).

``decide`` (a function of the request) may replace the script, e.g. to fail a share of first attempts.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time()
    answer: str = ""


@dataclass
class Receiver:
    script: list = field(default_factory=lambda: [200])
    decide: Callable[[Received], object] | None = None
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    held: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                item = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.lock:
                    n = len(receiver.requests)
                    receiver.requests.append(item)
                    if receiver.decide is not None:
                        behaviour = receiver.decide(item)
                    else:
                        behaviour = receiver.script[min(n, len(receiver.script) - 1)]
                item.answer = str(behaviour)
                receiver.answer(self, str(behaviour))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def answer(self, handler: BaseHTTPRequestHandler, behaviour: str) -> None:
        if behaviour == "drop":
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if behaviour == "hold":
            self.held.wait(60)
            behaviour = "200"
        code, _, extra = behaviour.partition(":")
        headers = {}
        if extra.startswith("date:"):
            headers["Retry-After"] = formatdate(time.time() + float(extra[5:]), usegmt=True)
        elif extra:
            headers["Retry-After"] = extra
        body = b'{"ok": true}' if code.startswith("2") else f"status {code}".encode()
        try:
            handler.send_response(int(code))
            for k, v in headers.items():
                handler.send_header(k, v)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            pass  # the client went away (a killed worker)

    def release(self) -> None:
        self.held.set()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    """A receiver process for the deliveries bench: fails ``--fail`` of first attempts (by delivery
    id) with 500, accepts the rest, and appends one JSON line per request to ``--log``."""
    import argparse
    import json
    import random
    import signal
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", type=float, default=0.3)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    out = open(args.log, "a", buffering=1)  # noqa: SIM115 - line-buffered for the reader

    def decide(request: Received) -> str:
        delivery = request.headers.get("x-deputies-delivery", "0")
        first = request.headers.get("x-deputies-attempt") == "1"
        answer = "500" if first and random.Random(int(delivery)).random() < args.fail else "200"
        out.write(json.dumps({"delivery": delivery, "attempt": request.headers.get("x-deputies-attempt"),
                              "at": request.at, "answer": answer}) + "\n")  # fmt: skip
        return answer

    receiver = Receiver(decide=decide)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(receiver.url, flush=True)
    with receiver:
        receiver.thread.join()


if __name__ == "__main__":
    main()

"""``deputies run --server URL``: the terminal client of a running Deputies, over its API.

It starts the session with ``POST /api/v1/sessions`` and follows it over the session's websocket
(``/ws/sessions/<id>/``, ``Authorization: Bearer <token>``): events are pushed as they are written,
nothing polls. A dropped socket is reopened after the last event seen (``?after=<seq>``), so nothing
is missed or printed twice. Ctrl-C cancels the session through the API. No Django here: the client
needs only httpx and websockets, and the token is sent in headers only, never printed or logged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect

TERMINAL = {"completed", "failed", "cancelled", "archived"}
RECONNECTS = 5  # reopen attempts in a row that bring no new event, before giving up
# Backoff between reopens (seconds): FIRST * 2**failures, at most MAX. A backoff, not a wait for the
# server: the next attempt itself finds out whether it is back.
RECONNECT_FIRST, RECONNECT_MAX = 0.2, 5.0
CLOSE_REASONS = {4401: "the token was refused", 4404: "the session is not visible to this token"}


class ClientError(Exception):
    """Printed as one line by the CLI (deputies/cli.py turns it into a CLIError)."""


def websocket_url(server: str, session_id: int, after: int) -> str:
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ClientError(f"--server {server}: expected an http:// or https:// URL")
    path = parts.path.rstrip("/") + f"/ws/sessions/{session_id}/"
    return urlunsplit((scheme, parts.netloc, path, f"after={after}", ""))


def api_error(response: httpx.Response) -> ClientError:
    try:
        body = response.json()
        detail = body.get("detail") or json.dumps(body)
        errors = body.get("errors")
        if errors:
            detail += " " + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in errors.items())
    except ValueError:
        detail = response.text.strip()[:200] or response.reason_phrase
    return ClientError(f"the server answered {response.status_code}: {detail}")


def repository_url(repo: str) -> str:
    """A local path is sent resolved (the server reads it on its own host); URLs as given."""
    if "://" in repo or repo.startswith("git@"):
        return repo
    return str(Path(repo).expanduser().resolve())


def current_branch(repo: str) -> str:
    path = Path(repo).expanduser()
    if "://" in repo or not (path / ".git").exists():
        return ""
    proc = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
    )
    branch = proc.stdout.strip()
    return "" if proc.returncode != 0 or branch == "HEAD" else branch


class RemoteRun:
    def __init__(self, server: str, token: str, describe) -> None:
        websocket_url(server, 0, 0)  # refuses anything but an http(s) URL, before any request
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=self.server, headers=self.headers, timeout=30)
        self.describe = describe
        self.after = 0
        self.status = ""
        self.totals = {"input": 0, "output": 0, "cost": Decimal("0")}

    def call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.server}: {exc}") from None
        if response.status_code >= 400:
            raise api_error(response)
        return response.json()

    def start(self, *, repo: str, prompt: str, model: str, base_branch: str) -> dict:
        body = {"repository_url": repository_url(repo), "prompt": prompt}
        if model:
            body["model"] = model
        if branch := base_branch or current_branch(repo):
            body["base_branch"] = branch
        return self.call("POST", "/api/v1/sessions", json=body)

    def follow(self, session_id: int) -> int:
        """Print events until the session ends; exit code 0 only when it completed."""
        started = time.monotonic()
        interactive = sys.stdout.isatty()
        try:
            failures = 0
            while self.status not in TERMINAL:
                seen = self.after
                try:
                    self.stream(session_id, started, interactive)
                except InvalidStatus as exc:
                    raise ClientError(
                        f"the server refused the stream: HTTP {exc.response.status_code}"
                    ) from None
                except (InvalidHandshake, OSError, TimeoutError) as exc:
                    problem = str(exc) or type(exc).__name__
                else:
                    problem = "the server closed the stream"
                if self.status in TERMINAL:
                    break
                failures = 0 if self.after > seen else failures + 1
                if failures > RECONNECTS:
                    raise ClientError(f"lost the stream of session {session_id}: {problem}")
                time.sleep(
                    min(RECONNECT_FIRST * 2**failures, RECONNECT_MAX)
                )  # then reopen after the last seen
        except KeyboardInterrupt:
            try:
                self.call("POST", f"/api/v1/sessions/{session_id}/cancel")
            except ClientError as exc:
                print(f"\ncould not cancel: {exc}", file=sys.stderr, flush=True)
            print("\ncancelled", flush=True)
            return 130
        if interactive:
            print()
        session = self.call("GET", f"/api/v1/sessions/{session_id}")
        line = f"session {session_id} {session['status']}: {session.get('summary') or session.get('error') or ''}"
        print(line.rstrip(": "), flush=True)
        return 0 if session["status"] == "completed" else 1

    def stream(self, session_id: int, started: float, interactive: bool) -> None:
        """One connection: events after ``self.after`` until the session ends or the socket closes."""
        url = websocket_url(self.server, session_id, self.after)
        with connect(url, additional_headers=self.headers, open_timeout=10, max_size=2**24) as ws:
            try:
                for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("type") != "event":
                        continue
                    event = frame["event"]
                    if event["seq"] <= self.after:
                        continue
                    self.after = event["seq"]
                    self.show(event, started, interactive)
                    if self.status in TERMINAL:
                        return
            except ConnectionClosed:
                pass
        if ws.close_code in CLOSE_REASONS:
            raise ClientError(
                f"the server closed the stream: {CLOSE_REASONS[ws.close_code]} ({ws.close_code})"
            )

    def show(self, event: dict, started: float, interactive: bool) -> None:
        kind, payload = event["type"], event.get("payload") or {}
        if kind == "status":
            self.status = payload.get("status", self.status)
        elif kind == "usage":
            self.totals["input"] += int(payload.get("input_tokens") or 0)
            self.totals["output"] += int(payload.get("output_tokens") or 0)
            self.totals["cost"] += Decimal(str(payload.get("cost_usd") or "0"))
        line = self.describe(kind, payload)
        if line:
            print(("\r\033[K" if interactive else "") + line, flush=True)
        if interactive:
            t = self.totals
            sys.stdout.write(
                f"\r\033[K[{self.status or 'queued'}] {time.monotonic() - started:5.1f}s  "
                f"tokens {t['input']}+{t['output']}  ${t['cost']:.4f}"
            )
            sys.stdout.flush()


def run_remote(args, describe) -> int:
    if not args.token:
        raise ClientError("--server needs an API token: pass --token or set DEPUTIES_TOKEN")
    prompt = args.prompt.strip()
    if not prompt:
        raise ClientError("the prompt is empty")
    client = RemoteRun(args.server, args.token, describe)
    session = client.start(repo=args.repo, prompt=prompt, model=args.model, base_branch=args.base_branch)
    print(f"session {session['id']}: {session['title']}", flush=True)
    return client.follow(session["id"])

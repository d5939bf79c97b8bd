"""A loopback GitHub for tests: the REST endpoints the integration uses (spoken to by the real
PyGithub through ``DEPUTIES_GITHUB_API_URL``) and a real git smart-HTTP server (``git
http-backend`` behind a small handler) that serves bare repositories only to a live installation
token, so clone and push prove the credential path works.

The API checks what GitHub checks: an installation token is granted only for a JWT signed with the
app's private key (verified with its public key, issuer = the app id), and every other call needs
a token it granted. Every call is recorded; ``fail_next`` makes the next matching calls answer an
error (500, a secondary rate limit with ``Retry-After``).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

APP_ID = "4242"
INSTALLATION_ID = 77


def new_app_key() -> tuple[str, str]:
    """(private PEM, public PEM) of a fresh RSA key for the app."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@dataclass
class Call:
    method: str
    path: str
    query: dict
    body: dict | list | None
    status: int


@dataclass
class Repo:
    full_name: str
    default_branch: str = "main"
    permissions: dict[str, str] = field(default_factory=dict)
    issues: dict[int, dict] = field(default_factory=dict)
    comments: dict[int, list[dict]] = field(default_factory=dict)
    pulls: dict[int, dict] = field(default_factory=dict)
    reactions: list[tuple[str, str]] = field(default_factory=list)  # (path, content)
    next_number: int = 1


class FakeGitHub:
    def __init__(self, git_root: Path, app_id: str = APP_ID, public_key: str = "") -> None:
        self.app_id = app_id
        self.public_key = public_key
        self.git_root = git_root
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, float] = {}  # granted token -> expiry (unix)
        self.calls: list[Call] = []
        self.faults: list[list] = []  # [method, path regex, status, headers, remaining]
        self.lock = threading.RLock()
        self.ids = iter(range(1000, 10**9))
        self.api = ThreadingHTTPServer(("127.0.0.1", 0), self._api_handler())
        self.git = ThreadingHTTPServer(("127.0.0.1", 0), self._git_handler())
        self.git_auth: list[tuple[str, bool]] = []  # (path, token accepted)
        self.token_ttl = 3600.0  # seconds a granted installation token lives
        self.url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.git_url = f"http://127.0.0.1:{self.git.server_address[1]}"

    # --- set-up -----------------------------------------------------------------------------------
    def __enter__(self) -> FakeGitHub:
        for server in (self.api, self.git):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in (self.api, self.git):
            server.shutdown()
            server.server_close()

    def add_repo(self, full_name: str, source: Path, writers=("alice",)) -> Repo:
        """A repository whose bare git copy (cloned from ``source``) the git server serves."""
        bare = self.git_root / f"{full_name}.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(source), str(bare)], check=True)
        repo = Repo(full_name, permissions={w: "write" for w in writers})
        self.repos[full_name] = repo
        return repo

    def add_issue(self, full_name: str, title: str, body: str, comments=()) -> dict:
        repo = self.repos[full_name]
        with self.lock:
            number = repo.next_number
            repo.next_number += 1
            issue = {
                "number": number,
                "title": title,
                "body": body,
                "state": "open",
                "html_url": f"https://github.test/{full_name}/issues/{number}",
                "url": f"{self.url}/repos/{full_name}/issues/{number}",
                "user": {"login": "alice", "id": 1, "type": "User"},
                "labels": [],
            }
            repo.issues[number] = issue
            repo.comments[number] = [
                self._comment(full_name, number, login, text) for login, text in comments
            ]
        return issue

    def add_pull(
        self, full_name: str, title: str, head: str, head_repo: str = "", base: str = "main"
    ) -> dict:
        """Someone's pull request from ``head`` (a branch of ``head_repo``, this repository by default)."""
        repo = self.repos[full_name]
        with self.lock:
            number = repo.next_number
            repo.next_number += 1
            pr = {
                "number": number, "title": title, "body": "", "state": "open",
                "head": {"ref": head, "label": f"{(head_repo or full_name).split('/')[0]}:{head}",
                         "repo": {"full_name": head_repo or full_name}},
                "base": {"ref": base},
                "html_url": f"https://github.test/{full_name}/pull/{number}",
                "pull_request": {}, "user": {"login": "alice", "id": 5, "type": "User"},
            }  # fmt: skip
            repo.pulls[number] = pr
        return {**self._pull_json(full_name, pr), "url": f"{self.url}/repos/{full_name}/issues/{number}"}

    def clone_url(self, full_name: str) -> str:
        return f"{self.git_url}/{full_name}.git"

    def fail_next(
        self, method: str, path: str, status: int, headers: dict | None = None, count: int = 1
    ) -> None:
        with self.lock:
            self.faults.append([method, re.compile(path), status, headers or {}, count])

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.search(pattern, c.path)]

    def branch_log(self, full_name: str, branch: str) -> list[str]:
        """Commit subjects on ``branch`` of the served repository, newest first."""
        bare = self.git_root / f"{full_name}.git"
        out = subprocess.run(
            ["git", "log", "--format=%H %an <%ae>%n%B%n--end--", f"refs/heads/{branch}"],
            cwd=bare, capture_output=True, text=True,
        )  # fmt: skip
        return [e.strip() for e in out.stdout.split("--end--") if e.strip()] if out.returncode == 0 else []

    def file_at(self, full_name: str, ref: str, path: str) -> str:
        bare = self.git_root / f"{full_name}.git"
        return subprocess.run(
            ["git", "show", f"{ref}:{path}"], cwd=bare, capture_output=True, text=True
        ).stdout

    # --- helpers ----------------------------------------------------------------------------------
    def _comment(self, full_name: str, number: int, login: str, text: str) -> dict:
        cid = next(self.ids)
        return {
            "id": cid,
            "body": text,
            "user": {"login": login, "id": 5, "type": "User"},
            "html_url": f"https://github.test/{full_name}/issues/{number}#issuecomment-{cid}",
            "url": f"{self.url}/repos/{full_name}/issues/comments/{cid}",
        }

    def token_ok(self, token: str) -> bool:
        with self.lock:
            return self.tokens.get(token, 0) > time.time()

    def _pull_json(self, full_name: str, pr: dict) -> dict:
        return {**pr, "url": f"{self.url}/repos/{full_name}/pulls/{pr['number']}"}

    # --- the REST API -----------------------------------------------------------------------------
    def _api_handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, data, headers: dict | None = None) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                parts = urlsplit(self.path)
                path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, data, headers = fake._route(
                    method, path, query, body, self.headers.get("Authorization", "")
                )
                with fake.lock:
                    fake.calls.append(Call(method, path, query, body, status))
                self._answer(status, data, headers)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

        return Handler

    def _route(self, method: str, path: str, query: dict, body, auth: str):
        with self.lock:
            for fault in self.faults:
                if fault[0] == method and fault[1].search(path) and fault[4] > 0:
                    fault[4] -= 1
                    return (
                        fault[2],
                        {
                            "message": "You have exceeded a secondary rate limit"
                            if fault[2] in (403, 429)
                            else "Server Error"
                        },
                        fault[3],
                    )
        scheme, _, credential = auth.partition(" ")
        m = re.fullmatch(r"/app/installations/(\d+)/access_tokens", path)
        if m and method == "POST":
            if scheme.lower() != "bearer":
                return 401, {"message": "A JSON web token could not be decoded"}, {}
            try:
                claims = jwt.decode(credential, self.public_key, algorithms=["RS256"])
            except jwt.PyJWTError as exc:
                return 401, {"message": f"bad JWT: {exc}"}, {}
            if str(claims.get("iss")) != self.app_id:
                return 401, {"message": "wrong issuer"}, {}
            token = "ghs_" + secrets.token_urlsafe(24)
            expires = datetime.now(UTC) + timedelta(seconds=self.token_ttl)
            with self.lock:
                self.tokens[token] = expires.timestamp()
            return (
                201,
                {"token": token, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "permissions": {}},
                {},
            )
        if scheme.lower() not in ("token", "bearer") or not self.token_ok(credential):
            return 401, {"message": "Bad credentials"}, {}
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)(/.*)?", path)
        if not m or m.group(1) not in self.repos:
            return 404, {"message": "Not Found"}, {}
        full, rest = m.group(1), m.group(2) or ""
        repo = self.repos[full]
        with self.lock:
            if method == "GET" and (m2 := re.fullmatch(r"/collaborators/([^/]+)/permission", rest)):
                login = m2.group(1)
                perm = repo.permissions.get(login, "read")
                return 200, {"permission": perm, "role_name": perm, "user": {"login": login}}, {}
            if method == "GET" and (m2 := re.fullmatch(r"/issues/(\d+)", rest)):
                number = int(m2.group(1))
                item = repo.issues.get(number) or repo.pulls.get(number)
                return (200, item, {}) if item else (404, {"message": "Not Found"}, {})
            if m2 := re.fullmatch(r"/issues/(\d+)/comments", rest):
                number = int(m2.group(1))
                if method == "GET":
                    return 200, repo.comments.get(number, []), {}
                comment = self._comment(full, number, "deputies[bot]", body["body"])
                repo.comments.setdefault(number, []).append(comment)
                return 201, comment, {}
            if method == "POST" and re.fullmatch(r"/(issues|pulls)/(comments/)?\d+/reactions", rest):
                repo.reactions.append((rest, body["content"]))
                return 201, {"id": next(self.ids), "content": body["content"]}, {}
            if rest == "/pulls" and method == "POST":
                number = repo.next_number
                repo.next_number += 1
                pr = {
                    "number": number, "title": body["title"], "body": body.get("body", ""), "state": "open",
                    "head": {"ref": body["head"], "label": f"{full.split('/')[0]}:{body['head']}",
                             "repo": {"full_name": full, "name": full.split("/")[1]}},
                    "base": {"ref": body["base"]},
                    "html_url": f"https://github.test/{full}/pull/{number}",
                    "pull_request": {}, "user": {"login": "deputies[bot]", "id": 9, "type": "Bot"},
                }  # fmt: skip
                repo.pulls[number] = pr
                return 201, self._pull_json(full, pr), {}
            if rest == "/pulls" and method == "GET":
                head = query.get("head", "")
                found = [
                    self._pull_json(full, p) for p in repo.pulls.values()
                    if (not head or p["head"]["label"] == head) and p["state"] == query.get("state", "open")
                ]  # fmt: skip
                return 200, found, {}
            if m2 := re.fullmatch(r"/pulls/(\d+)", rest):
                pr = repo.pulls.get(int(m2.group(1)))
                if pr is None:
                    return 404, {"message": "Not Found"}, {}
                if method == "PATCH":
                    pr.update({k: v for k, v in body.items() if k in ("title", "body", "state")})
                return 200, self._pull_json(full, pr), {}
        return 404, {"message": f"the fake has no {method} {rest}"}, {}

    # --- git over HTTP ----------------------------------------------------------------------------
    def _git_handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _authorized(self) -> bool:
                scheme, _, value = self.headers.get("Authorization", "").partition(" ")
                token = ""
                if scheme.lower() == "basic":
                    try:
                        user, _, token = base64.b64decode(value).decode().partition(":")
                    except ValueError:
                        token = ""
                elif scheme.lower() == "bearer":
                    token = value
                ok = fake.token_ok(token)
                with fake.lock:
                    fake.git_auth.append((self.path, ok))
                return ok

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _cgi(self, method: str) -> None:
                if not self._authorized():
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="fake github"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                parts = urlsplit(self.path)
                body = self._body() if method == "POST" else b""
                env = {
                    "PATH": "/usr/bin:/bin",
                    "GIT_PROJECT_ROOT": str(fake.git_root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "REMOTE_USER": "x-access-token",
                    "REMOTE_ADDR": "127.0.0.1",
                    "REQUEST_METHOD": method,
                    "PATH_INFO": parts.path,
                    "QUERY_STRING": parts.query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                    "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                }
                out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                status, headers = 200, []
                for line in head.decode().split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.strip().split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                self._cgi("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._cgi("POST")

        return Handler


def signed(secret: str, payload: dict, event: str, guid: str) -> tuple[bytes, dict[str, str]]:
    """A webhook delivery as GitHub sends it."""
    import hashlib
    import hmac

    raw = json.dumps(payload).encode()
    return raw, {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": guid,
        "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest(),
    }


def issue_comment(
    fake: FakeGitHub, full_name: str, issue: dict, text: str, login: str = "alice", *, pr: bool = False
) -> dict:
    repo = fake.repos[full_name]
    comment = fake._comment(full_name, issue["number"], login, text)
    repo.comments.setdefault(issue["number"], []).append(comment)
    item = {k: v for k, v in issue.items() if k != "pull_request"}
    if pr:
        item["pull_request"] = {"url": issue.get("url", "")}
    return {
        "action": "created",
        "issue": item,
        "comment": comment,
        "repository": {
            "full_name": full_name,
            "clone_url": fake.clone_url(full_name),
            "default_branch": repo.default_branch,
        },
        "sender": {"login": login, "id": 5, "type": "User"},
        "installation": {"id": INSTALLATION_ID},
    }

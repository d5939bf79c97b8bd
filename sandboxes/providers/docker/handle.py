"""One docker sandbox: commands through exec, files through the archive API."""

from __future__ import annotations

import codecs
import io
import logging
import posixpath
import secrets
import select
import tarfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import PurePosixPath

import docker
from django.conf import settings

from sandboxes.base import (
    CANCELLED_EXIT_CODE,
    LIST_FILES_LIMIT,
    Cancel,
    ExecResult,
    OutputCallback,
    PathEscape,
    SandboxError,
)
from sandboxes.providers.docker.engine import WORKSPACE, engine_client, engine_errors
from sandboxes.providers.docker.scripts import EXEC_SCRIPT, FIND_SCRIPT, KILL_SCRIPT, RESOLVE_SCRIPT
from sandboxes.providers.local import MAX_CAPTURE_CHARS, TIMEOUT_EXIT_CODE

log = logging.getLogger(__name__)

DRAIN_GRACE = 1.0  # seconds to keep reading once the command is known to have ended
KILL_GRACE = 5.0  # after a timeout kill, how long to wait for the output stream to close
IDLE_POLL = 1.0  # a silent command: how often to ask the engine whether it has ended
RESOLVE_BATCH = 256  # paths per resolver exec, well under any argv limit


def _checked_env(env: dict[str, str] | None) -> dict[str, str]:
    environment = {}
    for key, value in (env or {}).items():
        key, value = str(key), str(value)
        if not key or "=" in key or "\x00" in key + value:
            raise SandboxError(f"invalid environment variable name {key!r}")
        environment[key] = value
    return environment


def _inside(path: str) -> bool:
    return path == WORKSPACE or path.startswith(WORKSPACE + "/")


def _relative(path: str) -> str:
    return posixpath.relpath(path, WORKSPACE) if path != WORKSPACE else "."


def _ancestors(name: str) -> set[str]:
    """The proper ancestors of a relative path: "a/b/c" -> {"a", "a/b"}."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return {"/".join(parts[:i]) for i in range(1, len(parts))}


@dataclass(frozen=True)
class Resolved:
    path: str  # the real path inside the container
    kind: str  # d, f, x (executable file), o (other), - (missing)
    parent: str  # the deepest directory on ``path`` that exists


# --- a sandbox ------------------------------------------------------------------------------------


class DockerHandle:
    workspace = WORKSPACE

    def __init__(self, sandbox_id: str, user: str, env: dict[str, str] | None = None):
        self.id = sandbox_id
        self.user = user
        uid, _, gid = user.partition(":")
        self.uid, self.gid = int(uid), int(gid or uid)
        # The spec's variables (secrets among them) go with each exec, never into the container's
        # configuration, which the engine keeps on its disk and shows to anyone who inspects it.
        self.env = _checked_env(env)

    def __repr__(self) -> str:
        return f"<DockerHandle {self.id}>"

    @property
    def api(self) -> docker.APIClient:
        return engine_client().api

    # --- plumbing -------------------------------------------------------------------------------

    def _run(self, argv: list[str]) -> tuple[bytes, bytes]:
        """A short internal command as the sandbox user: (stdout, stderr), no streaming.

        Read through ``_ExecStream`` like ``exec``, not ``exec_start(demux=True)``: the SDK's own
        reader misses frames the HTTP client buffered with the response headers.
        """
        with engine_errors(f"sandbox {self.id}"):
            exec_id = self.api.exec_create(
                self.id, argv, stdout=True, stderr=True, user=self.user, workdir=WORKSPACE
            )["Id"]
            sock = self.api.exec_start(exec_id, socket=True)
        stream = _ExecStream(sock, None, binary=True)
        try:
            while True:
                if not stream.wait_readable(settings.DOCKER_API_TIMEOUT):
                    raise SandboxError(
                        f"sandbox {self.id}: an internal command sent nothing for "
                        f"{settings.DOCKER_API_TIMEOUT} s"
                    )
                if not stream.read():
                    break
        finally:
            stream.close()
        return bytes(stream.binary["stdout"]), bytes(stream.binary["stderr"])

    def _kill(self, token: str) -> None:
        try:
            self._run(["/bin/sh", "-c", KILL_SCRIPT, "deputies-kill", token])
        except SandboxError as exc:
            log.warning("could not kill a command in %s: %s", self.id, exc)

    def _kill_soon(self, token: str) -> None:
        """The kill for a ``Cancel``: a second exec, on its own thread (``Cancel.set`` must be quick)."""
        threading.Thread(target=self._kill, args=(token,), name=f"kill-{self.id}", daemon=True).start()

    def _candidate(self, path: str) -> str:
        if not isinstance(path, str) or not path or "\x00" in path:
            raise SandboxError(f"invalid path {path!r}")
        if path.startswith("/"):
            inner = posixpath.normpath(path)
            if not _inside(inner):
                raise PathEscape(
                    f"{path!r} is outside the workspace: use a path relative to the workspace "
                    f"or under {WORKSPACE}"
                )
            return inner
        return f"{WORKSPACE}/{path}"

    def resolve_many(self, paths: list[str]) -> list[Resolved]:
        """Where each path really leads inside the container; PathEscape for any outside."""
        found: list[Resolved] = []
        for start in range(0, len(paths), RESOLVE_BATCH):
            batch = paths[start : start + RESOLVE_BATCH]
            candidates = [self._candidate(p) for p in batch]
            out, err = self._run(["/bin/sh", "-c", RESOLVE_SCRIPT, "deputies-resolve", *candidates])
            fields = out.split(b"\0")
            if len(fields) != 3 * len(batch) + 1 or fields[-1]:
                detail = (err or out).decode("utf-8", "replace").strip()[-500:]
                raise SandboxError(f"could not resolve paths in sandbox {self.id}: {detail or 'no answer'}")
            for i, shown in enumerate(batch):
                real, kind, parent = (f.decode("utf-8", "surrogateescape") for f in fields[3 * i : 3 * i + 3])
                if kind == "loop":
                    raise SandboxError(f"{shown}: too many levels of symbolic links")
                if not _inside(real) or not _inside(parent):
                    raise PathEscape(f"{shown!r} is outside the workspace ({WORKSPACE})")
                found.append(Resolved(real, kind, parent))
        return found

    def resolve(self, path: str) -> Resolved:
        return self.resolve_many([path])[0]

    def _upload(self, directory: str, data: bytes) -> None:
        with engine_errors(f"cannot write into {_relative(directory)} in sandbox {self.id}"):
            self.api.put_archive(self.id, directory, data)

    def _download(self, path: str) -> bytes:
        # Not api.get_archive(): it decodes the X-Docker-Container-Path-Stat header, which Podman
        # (4.3) encodes as URL-safe base64, so names whose encoding holds "-" or "_" failed with
        # "Incorrect padding". Nothing here needs that header.
        api = self.api
        with engine_errors(f"cannot read {_relative(path)} in sandbox {self.id}"):
            response = api._get(
                api._url("/containers/{0}/archive", self.id),
                params={"path": path},
                headers={"Accept-Encoding": "identity"},
                stream=True,
            )
            api._raise_for_status(response)
            return response.content

    def _owned(self, info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid, info.gid, info.uname, info.gname = self.uid, self.gid, "", ""
        return info

    def _dir_entry(self, name: str) -> tarfile.TarInfo:
        info = self._owned(tarfile.TarInfo(name))
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
        return info

    # --- commands -------------------------------------------------------------------------------

    def exec(
        self,
        argv: list[str],
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        cancel: Cancel | None = None,
    ) -> ExecResult:
        if not argv or not all(isinstance(a, str) and "\x00" not in a for a in argv):
            raise SandboxError("exec needs a non-empty list of strings")
        timeout = float(timeout if timeout is not None else settings.SANDBOX_EXEC_TIMEOUT)
        if timeout <= 0:
            raise SandboxError("exec timeout must be positive")
        environment = {**self.env, **_checked_env(env)}
        if cancel is not None and cancel.is_set():
            return ExecResult(CANCELLED_EXIT_CODE, "", "", cancelled=True)
        workdir = WORKSPACE
        if cwd not in (None, "", ".", WORKSPACE):
            where = self.resolve(cwd)
            if where.kind != "d":
                raise SandboxError(f"working directory {cwd!r} is not a directory in the workspace")
            workdir = where.path

        token = secrets.token_hex(8)
        started = time.monotonic()
        with engine_errors(f"cannot run a command in sandbox {self.id}"):
            exec_id = self.api.exec_create(
                self.id,
                ["/bin/sh", "-c", EXEC_SCRIPT, "deputies-exec", token, *argv],
                stdout=True,
                stderr=True,
                stdin=False,
                tty=False,
                environment=environment,
                workdir=workdir,
                user=self.user,
            )["Id"]
            sock = self.api.exec_start(exec_id, socket=True)
        stream = _ExecStream(sock, on_output)
        ended = False
        timed_out = False
        hook = cancel.on_set(lambda: self._kill_soon(token)) if cancel else nullcontext(lambda: False)
        with hook as cancelled:
            try:
                ended, timed_out = self._pump(stream, exec_id, token, started + timeout, cancelled)
            except BaseException:
                if not ended:  # on_output raised, or the worker is being stopped
                    self._kill(token)
                raise
            finally:
                stream.close()
        stdout, stderr = stream.results()
        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
        elif cancelled():
            exit_code = CANCELLED_EXIT_CODE
        else:
            exit_code = self._exit_code(exec_id)
        return ExecResult(
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            duration=time.monotonic() - started,
            cancelled=cancelled() and not timed_out,
        )

    def _pump(
        self, stream: _ExecStream, exec_id: str, token: str, deadline: float, cancelled
    ) -> tuple[bool, bool]:
        """Read until the stream closes: (ended normally, timed out).

        ``cancelled()`` turns true once a ``Cancel`` sent the kill (from another thread); from then
        on, as after a timeout, the stream gets ``KILL_GRACE`` seconds to close.
        """
        timed_out = False
        stop_at = None  # once set, read no later than this
        last_poll = time.monotonic()
        while True:
            now = time.monotonic()
            if stop_at is not None and now >= stop_at:
                return False, timed_out
            if stop_at is None and cancelled():
                stop_at = now + KILL_GRACE
            if not timed_out and not cancelled() and now >= deadline:
                timed_out = True
                self._kill(token)
                stop_at = time.monotonic() + KILL_GRACE
                continue
            wait = (stop_at if stop_at is not None else deadline) - now
            if stop_at is None:
                wait = min(wait, IDLE_POLL)
            if stream.wait_readable(max(0.0, wait)):
                if not stream.read():
                    return True, timed_out
                last_poll = time.monotonic()
            elif stop_at is None and time.monotonic() - last_poll >= IDLE_POLL:
                # Silence: has the command ended while something outside its group holds the output?
                last_poll = time.monotonic()
                with engine_errors(f"sandbox {self.id}"):
                    info = self.api.exec_inspect(exec_id)
                # Not running *and* an exit code: on a loaded host an exec can take seconds to start.
                if not info.get("Running") and info.get("ExitCode") is not None:
                    stop_at = time.monotonic() + DRAIN_GRACE

    def _exit_code(self, exec_id: str) -> int:
        # The engine may report the exec as running for a moment after its output closed.
        deadline = time.monotonic() + 30
        with engine_errors(f"sandbox {self.id}"):
            while True:
                info = self.api.exec_inspect(exec_id)
                if not info.get("Running") and info.get("ExitCode") is not None:
                    return int(info["ExitCode"])
                if time.monotonic() > deadline:
                    raise SandboxError(f"sandbox {self.id}: the engine never reported the exit code")
                time.sleep(0.01)

    # --- files ----------------------------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        target = self.resolve(path)
        if target.kind == "-":
            raise SandboxError(f"no such file: {path}")
        if target.kind == "d":
            raise SandboxError(f"{path} is a directory")
        if target.kind == "o":
            raise SandboxError(f"{path} is not a regular file")
        data = self._download(target.path)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isreg():
                    return tar.extractfile(member).read()
        raise SandboxError(f"cannot read {path}: the engine sent no file")

    def write_file(self, path: str, data: bytes) -> None:
        target = self.resolve(path)
        if target.path == WORKSPACE:
            raise SandboxError("cannot write to the workspace directory itself")
        if target.kind == "d":
            raise SandboxError(f"{path} is a directory")
        if target.kind == "o":
            raise SandboxError(f"{path} is not a regular file")
        relative = posixpath.relpath(target.path, target.parent)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(_ancestors(relative)):
                tar.addfile(self._dir_entry(name))
            info = self._owned(tarfile.TarInfo(relative))
            # Replacing the file must not lose its executable bit (scripts the agent edits).
            info.size, info.mode, info.mtime = len(data), 0o755 if target.kind == "x" else 0o644, time.time()
            tar.addfile(info, io.BytesIO(data))
        self._upload(target.parent, buffer.getvalue())

    def list_files(self, path: str = ".") -> list[str]:
        target = self.resolve(path)
        if target.kind in ("f", "x"):
            return [_relative(target.path)]
        if target.kind != "d":
            raise SandboxError(f"no such file or directory: {path}")
        out, err = self._run(["/bin/sh", "-c", FIND_SCRIPT, "deputies-find", target.path])
        if not out and err.strip():
            raise SandboxError(f"cannot list {path}: {err.decode('utf-8', 'replace').strip()[-500:]}")
        names = [_relative(p.decode("utf-8", "surrogateescape")) for p in out.split(b"\0") if p]
        return sorted(names)[:LIST_FILES_LIMIT]

    def put_archive(self, path: str, data: bytes) -> None:
        dest = self.resolve(path)
        if dest.kind not in ("d", "-"):
            raise SandboxError(f"cannot extract into {path}: not a directory")
        # A missing destination is created by the upload itself, from its deepest existing parent.
        lead = "" if dest.kind == "d" else posixpath.relpath(dest.path, dest.parent)

        def inside_upload(name: str) -> str:
            return posixpath.join(lead, name) if lead else name

        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src:
                checked = self._check_members(src.getmembers(), _relative(dest.path))
                needed = set()
                for member, name in checked:
                    needed |= _ancestors(name)
                    if member.islnk():
                        needed |= _ancestors(posixpath.normpath(member.linkname))
                needed = sorted(needed)
                # Directories already in the sandbox may be links: ask where each really leads. Those
                # missing are made here, or the engine would create them as root.
                present = set()
                if dest.kind == "d":  # under a missing destination nothing exists yet
                    found = self.resolve_many([posixpath.join(dest.path, d) for d in needed])
                    present = {d for d, r in zip(needed, found, strict=True) if r.kind != "-"}
                explicit = {name for member, name in checked if member.isdir()}
                out = io.BytesIO()
                with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for name in sorted(_ancestors(lead) | ({lead} - {""})):
                        tar.addfile(self._dir_entry(name))
                    for name in needed:
                        if name not in present and name not in explicit:
                            tar.addfile(self._dir_entry(inside_upload(name)))
                    for member, name in checked:
                        info = self._sanitized(member, inside_upload(name), lead)
                        tar.addfile(info, src.extractfile(member) if member.isreg() else None)
        except tarfile.TarError as exc:
            raise SandboxError(f"not a valid tar archive: {exc}") from None
        self._upload(dest.path if dest.kind == "d" else dest.parent, out.getvalue())

    def _check_members(
        self, members: list[tarfile.TarInfo], dest_rel: str
    ) -> list[tuple[tarfile.TarInfo, str]]:
        """(member, normalized name) for what to extract; refuses anything that could land outside."""
        links: set[str] = set()
        checked = []

        def through_link(name: str) -> str | None:
            parts = name.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in links:
                    return "/".join(parts[:i])
            return None

        for member in members:
            name = member.name
            if not name or name.startswith("/") or ".." in PurePosixPath(name).parts:
                raise PathEscape(f"archive member {name!r} is outside the workspace")
            norm = posixpath.normpath(name)
            if norm == ".":
                continue
            if (link := through_link(norm)) is not None:
                raise PathEscape(f"archive member {name!r} goes through the link {link!r}")
            if member.issym():
                target = member.linkname
                lands = posixpath.normpath(posixpath.join(dest_rel, posixpath.dirname(norm), target))
                if target.startswith("/") or lands == ".." or lands.startswith("../"):
                    raise PathEscape(f"archive link {name!r} -> {target!r} points outside the workspace")
                links.add(norm)
            elif member.islnk():
                target = member.linkname
                if not target or target.startswith("/") or ".." in PurePosixPath(target).parts:
                    raise PathEscape(f"archive link {name!r} -> {target!r} points outside the workspace")
                if (link := through_link(posixpath.normpath(target))) is not None:
                    raise PathEscape(f"archive link {name!r} -> {target!r} goes through the link {link!r}")
            elif not (member.isreg() or member.isdir()):
                raise SandboxError(f"archive member refused: {name!r} is a special file")
            checked.append((member, norm))
        return checked

    def _sanitized(self, member: tarfile.TarInfo, name: str, lead: str) -> tarfile.TarInfo:
        """A clean copy: the sandbox user's, no setuid/setgid/sticky bits, no extended attributes."""
        info = self._owned(tarfile.TarInfo(name))
        info.mtime = member.mtime
        if member.isdir():
            info.type, info.mode = tarfile.DIRTYPE, (member.mode & 0o755) | 0o700
        elif member.issym():
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, member.linkname, 0o777
        elif member.islnk():
            target = posixpath.normpath(member.linkname)
            info.type, info.linkname = tarfile.LNKTYPE, posixpath.join(lead, target) if lead else target
            info.mode = (member.mode & 0o755) | 0o600
        else:
            info.type, info.size = tarfile.REGTYPE, member.size
            mode = (member.mode & 0o755) | 0o600
            info.mode = mode if mode & 0o100 else mode & ~0o111
        return info

    def get_archive(self, path: str = ".") -> bytes:
        target = self.resolve(path)
        if target.kind == "-":
            raise SandboxError(f"no such file or directory: {path}")
        data = self._download(target.path)
        if target.kind != "d":
            return data  # one member, named by the file's base name
        # The engine names a directory's members "<dirname>/..."; the interface wants them relative.
        prefix = posixpath.basename(target.path) + "/"
        out = io.BytesIO()
        try:
            with (
                tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src,
                tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for member in src:
                    if not member.name.startswith(prefix):
                        continue  # the directory itself
                    member.name = member.name[len(prefix) :]
                    if member.islnk() and member.linkname.startswith(prefix):
                        member.linkname = member.linkname[len(prefix) :]
                    member.pax_headers = {}  # they would carry the old names
                    tar.addfile(member, src.extractfile(member) if member.isreg() else None)
        except tarfile.TarError as exc:
            raise SandboxError(f"the engine sent a broken archive of {path}: {exc}") from None
        return out.getvalue()


def _read_ahead(sock, raw) -> bytes:
    """What the HTTP client already read past the upgrade response's headers.

    The SDK hands out the bare socket, but ``http.client`` parsed the headers through a buffered
    reader that may have taken the first frames with them; reading only the socket would lose that
    output. Podman often sends both in one write; Docker on a loaded host does too. With the socket
    non-blocking, ``read1`` returns the buffered bytes, or whatever is ready now, or nothing.
    """
    response = getattr(sock, "_response", None)
    reader = getattr(getattr(getattr(response, "raw", None), "_fp", None), "fp", None)
    if reader is None or not hasattr(reader, "read1"):
        return b""
    raw.setblocking(False)
    try:
        return reader.read1(1 << 20) or b""
    except (BlockingIOError, InterruptedError):
        return b""
    except (OSError, ValueError):  # closed already; the stream's own read reports the end
        return b""
    finally:
        raw.settimeout(None)


class _ExecStream:
    """The hijacked socket of one exec: Docker's multiplexed frames, decoded as they arrive.

    ``binary`` keeps the raw bytes per stream instead (internal commands print NUL-separated paths).
    """

    def __init__(self, sock, on_output: OutputCallback | None, *, binary: bool = False):
        self.sock = sock
        self.raw = getattr(sock, "_sock", sock)  # SocketIO wraps the socket on unix and plain tcp
        self.early = _read_ahead(sock, self.raw)
        self.raw.settimeout(None)  # select() decides how long to wait, not the HTTP client's timeout
        self.on_output = on_output
        self.binary: dict[str, bytearray] | None = (
            {"stdout": bytearray(), "stderr": bytearray()} if binary else None
        )
        self.buffer = bytearray()
        self.decoders = {n: codecs.getincrementaldecoder("utf-8")("replace") for n in ("stdout", "stderr")}
        self.chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.captured = {"stdout": 0, "stderr": 0}
        self.dropped = {"stdout": 0, "stderr": 0}

    def wait_readable(self, timeout: float) -> bool:
        if self.early:
            return True
        pending = getattr(self.raw, "pending", None)  # TLS may hold decrypted bytes select cannot see
        if pending is not None and pending() > 0:
            return True
        readable, _, _ = select.select([self.raw], [], [], timeout)
        return bool(readable)

    def read(self) -> bool:
        """Read what is there; False at the end of the stream."""
        if self.early:
            data, self.early = self.early, b""
        else:
            try:
                data = self.raw.recv(65536)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
        self.buffer += data
        while len(self.buffer) >= 8:
            size = int.from_bytes(self.buffer[4:8], "big")
            if len(self.buffer) < 8 + size:
                break
            name = "stderr" if self.buffer[0] == 2 else "stdout"
            payload = bytes(self.buffer[8 : 8 + size])
            del self.buffer[: 8 + size]
            if self.binary is not None:
                self.binary[name] += payload
            else:
                self.emit(name, self.decoders[name].decode(payload))
        return True

    def emit(self, name: str, text: str) -> None:
        if not text:
            return
        if self.captured[name] + len(text) > MAX_CAPTURE_CHARS:
            self.dropped[name] += len(text)
        else:
            self.captured[name] += len(text)
            self.chunks[name].append(text)
        if self.on_output is not None:
            self.on_output(name, text)

    def results(self) -> tuple[str, str]:
        for name in ("stdout", "stderr"):
            tail = self.decoders[name].decode(b"", final=True)
            if tail:
                self.chunks[name].append(tail)
            if self.dropped[name]:
                self.chunks[name].append(
                    f"\n[{self.dropped[name]} characters of {name} not kept by the sandbox]\n"
                )
        return "".join(self.chunks["stdout"]), "".join(self.chunks["stderr"])

    def close(self) -> None:
        for thing in (getattr(self.sock, "_response", None), self.sock, self.raw):
            try:
                if thing is not None:
                    thing.close()
            except Exception:  # closing a half-dead hijacked connection; nothing left to save
                pass

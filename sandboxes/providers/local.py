"""The local sandbox provider: a per-session directory on the worker host, commands as subprocesses.

With bubblewrap (``bwrap``) each command runs in fresh namespaces that see a read-only ``/usr`` and
``/etc``, a private ``/tmp``, ``/proc`` and ``/dev``, and the session's workspace at ``/workspace``
as the only writable persistent path; no network unless the spec asks for it; all capabilities
dropped. Without bubblewrap commands run directly on the worker host: the environment is still
minimal (the worker's secrets never reach the child), but nothing else is isolated, and
``capabilities().reason`` says so plainly.

File operations (read, write, archives) are done by the worker on the host path, so every path goes
through one resolver (``LocalHandle.resolve``) that refuses anything whose real path leaves the
workspace.

Exec semantics, shared by both modes:

* Each ``exec`` is self-contained: when the command exits, whatever it left running in its process
  group is killed (under bubblewrap the whole PID namespace dies with it anyway), so background
  processes never outlive the call and never hold it open.
* On timeout the whole process group is killed with SIGKILL, and the result has ``timed_out=True``
  and ``exit_code=124`` (the convention of coreutils ``timeout``). A command killed by a signal for
  any other reason reports ``128 + signal``, as a shell would.
* When the exec's ``Cancel`` is set (the run was cancelled), the group is killed the same way, at
  once, from the thread that set it; the result has ``cancelled=True`` and ``exit_code=137``.

The environment given to commands (``spec.env``, which may hold the environment's secrets) lives
only in the handle's memory and in the children's process environment: ``sandbox.json`` keeps the
variables' names, and ``connect(id, env=...)`` is given the values again by the worker, which
decrypts them from the database.
"""

from __future__ import annotations

import codecs
import json
import os
import posixpath
import re
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path, PurePosixPath

from django.conf import settings

from deputies.paths import realpath
from sandboxes.base import (
    CANCELLED_EXIT_CODE,
    LIST_FILES_LIMIT,
    Cancel,
    Capabilities,
    ExecResult,
    OutputCallback,
    PathEscape,
    SandboxError,
    SandboxLogs,
    SandboxSpec,
)

SANDBOX_WORKSPACE = "/workspace"  # where the workspace appears inside bubblewrap
TIMEOUT_EXIT_CODE = 124
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_CAPTURE_CHARS = 16 * 1024 * 1024  # per stream; protects the worker's memory, not a tool limit
DRAIN_GRACE = 1.0  # seconds to keep reading after the process group is dead
METADATA_FILE = "sandbox.json"
STAMP_FILE = "stamp"  # beside the workspace: its ctime is the filesystem's "now" (LocalHandle.tree_stamp)
SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")

DISK_USAGE_LIMIT = 100_000  # entries the logs page walks to size a workspace before it stops counting
NO_ENGINE_LOGS = (
    "the local provider keeps no logs of its own: each command is a subprocess of the worker, and "
    "what ran (with its output) is in the session's events"
)

UNISOLATED = "commands run on the worker host without isolation"
ISOLATION_OFF_REASON = f"isolation is switched off (DEPUTIES_SANDBOX_ISOLATION=none): {UNISOLATED}"

# bwrap path -> (works, reason); probing starts a process, so do it once per worker process.
_probe_cache: dict[str, tuple[bool, str]] = {}
_which_cache: dict[str | None, str] = {}  # PATH -> bwrap's path there ("": none)


def _minimal_env(home: str, *extra: dict[str, str] | None) -> dict[str, str]:
    """The child's whole environment. Never derived from os.environ: the worker's holds secrets."""
    env = {"PATH": DEFAULT_PATH, "HOME": home, "LANG": "C.UTF-8", "TERM": "dumb"}
    for more in extra:
        env.update({str(k): str(v) for k, v in (more or {}).items()})
    return env


def _bwrap_args(bwrap: str, workspace: Path, network: str, chdir: str = SANDBOX_WORKSPACE) -> list[str]:
    args = [bwrap, "--ro-bind", "/usr", "/usr"]
    # Merged-/usr hosts have /bin -> usr/bin and so on; older layouts have real directories.
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    args += [
        "--ro-bind", "/etc", "/etc",
        "--tmpfs", "/tmp",
        "--proc", "/proc",
        "--dev", "/dev",
        "--bind", str(workspace), SANDBOX_WORKSPACE,
        "--unshare-all",
    ]  # fmt: skip
    if network == "bridge":
        args += ["--share-net", "--ro-bind-try", "/run/systemd/resolve", "/run/systemd/resolve"]
    args += ["--cap-drop", "ALL", "--die-with-parent", "--chdir", chdir]
    return args


def probe_bwrap() -> tuple[bool, str]:
    """Whether bubblewrap is installed and can actually create namespaces here (cached)."""
    path = os.environ.get("PATH")
    found = _which_cache.get(path)
    if found is None or not os.access(found, os.X_OK):  # looked up once per PATH while it is there
        found = _which_cache[path] = shutil.which("bwrap", path=path) or ""
    bwrap = found or None
    if bwrap is None:
        return False, "bubblewrap (bwrap) is not installed"
    if bwrap not in _probe_cache:
        with tempfile.TemporaryDirectory(prefix="deputies-bwrap-probe-") as tmp:
            try:
                proc = subprocess.run(
                    [*_bwrap_args(bwrap, Path(tmp), "none"), "true"],
                    env=_minimal_env(SANDBOX_WORKSPACE),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                result = (False, f"bubblewrap (bwrap) could not start: {exc}")
            else:
                if proc.returncode == 0:
                    result = (True, "")
                else:
                    detail = proc.stderr.decode("utf-8", "replace").strip() or f"exit code {proc.returncode}"
                    result = (False, f"bubblewrap (bwrap) is installed but does not work here: {detail}")
        _probe_cache[bwrap] = result
    return _probe_cache[bwrap]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _has_exited(pid: int) -> bool:
    """True once the child is dead, without reaping it: its pid (our process group id) stays ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def run_process(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    timeout: float,
    on_output: OutputCallback | None = None,
    cancel: Cancel | None = None,
) -> ExecResult:
    """Run ``argv`` in its own process group, streaming stdout and stderr, killing the group at the end.

    Everything happens on the calling thread with a selector (no reader threads to leak). A pidfd,
    when the kernel has them, wakes the loop as soon as the child exits even if a grandchild still
    holds the pipes open -- also when ``cancel`` killed the group from another thread.
    """
    started = time.monotonic()
    if cancel is not None and cancel.is_set():
        return ExecResult(CANCELLED_EXIT_CODE, "", "", cancelled=True)
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise SandboxError(f"could not start {argv[0]!r}: {exc.strerror or exc}") from exc

    selector = selectors.DefaultSelector()
    streams = {"stdout": proc.stdout, "stderr": proc.stderr}
    decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in streams}
    chunks: dict[str, list[str]] = {name: [] for name in streams}
    captured = dict.fromkeys(streams, 0)
    dropped = dict.fromkeys(streams, 0)
    for name, pipe in streams.items():
        os.set_blocking(pipe.fileno(), False)
        selector.register(pipe, selectors.EVENT_READ, name)
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        except OSError:
            pidfd = None

    def emit(name: str, text: str) -> None:
        if not text:
            return
        size = len(text)
        if captured[name] + size > MAX_CAPTURE_CHARS:
            dropped[name] += size
        else:
            captured[name] += size
            chunks[name].append(text)
        if on_output is not None:
            on_output(name, text)

    deadline = started + timeout
    exited = False
    drain_until = 0.0
    timed_out = False
    hooks = ExitStack()
    cancelled = hooks.enter_context(cancel.on_set(lambda: _kill_group(proc.pid))) if cancel else lambda: False
    try:
        while True:
            now = time.monotonic()
            if not exited and _has_exited(proc.pid):
                exited = True
                _kill_group(proc.pid)  # leftovers in the group must not outlive the call
                drain_until = now + DRAIN_GRACE
                if pidfd is not None:
                    selector.unregister(pidfd)
            if exited and (now >= drain_until or not selector.get_map()):
                break  # all output read, or something outside the group holds the pipe
            if not exited and not timed_out and now >= deadline:
                timed_out = True
                _kill_group(proc.pid)
            if exited:
                wait = drain_until - now
            elif timed_out:
                wait = 1.0  # the kill is on its way; the pidfd (or the cap below) wakes us
            else:
                wait = deadline - now
            if pidfd is None and not exited:
                wait = min(wait, 0.05)
            for key, _ in selector.select(max(0.0, wait)):
                if key.data == "exit":
                    continue
                try:
                    data = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if data:
                    emit(key.data, decoders[key.data].decode(data))
                else:
                    selector.unregister(key.fileobj)
    finally:
        hooks.close()  # before the child is reaped: a late kill must never reach a reused pid
        if not exited:  # an exception (e.g. from on_output) interrupted the loop
            _kill_group(proc.pid)
        returncode = proc.wait()
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
        if pidfd is not None:
            os.close(pidfd)

    for name in streams:
        emit(name, decoders[name].decode(b"", final=True))
        if dropped[name]:
            chunks[name].append(f"\n[{dropped[name]} characters of {name} not kept by the sandbox]\n")
    if timed_out:
        exit_code = TIMEOUT_EXIT_CODE
    elif cancelled():
        exit_code = CANCELLED_EXIT_CODE
    elif returncode < 0:
        exit_code = 128 - returncode
    else:
        exit_code = returncode
    return ExecResult(
        exit_code=exit_code,
        stdout="".join(chunks["stdout"]),
        stderr="".join(chunks["stderr"]),
        timed_out=timed_out,
        duration=time.monotonic() - started,
        cancelled=cancelled() and not timed_out,
    )


def _disk_usage(root: Path) -> str:
    """Files and bytes under ``root`` without following links; stops counting after a bound."""
    files = size = entries = 0
    unreadable: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda exc: unreadable.append(exc.filename)):
        for name in filenames + dirnames:
            entries += 1
            try:
                info = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                files += 1
                size += info.st_size
        if entries >= DISK_USAGE_LIMIT:
            return f"over {size:,} bytes in over {files:,} files (stopped counting at {entries:,} entries)"
    text = f"{size:,} bytes in {files:,} files"
    return f"{text} ({len(unreadable)} directories could not be read)" if unreadable else text


def _rewrite(path: Path, meta: dict) -> None:
    """Replace a metadata file whole (a new file renamed over it), so the old bytes are unlinked."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".meta-")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise SandboxError(f"cannot rewrite {path}: {exc}") from exc


def _check_sandbox_id(sandbox_id: str) -> None:
    if not isinstance(sandbox_id, str) or not SANDBOX_ID.match(sandbox_id):
        raise SandboxError(f"invalid local sandbox id {sandbox_id!r}")


def _climbs_out(relative: str) -> bool:
    """Whether a normalised relative path leaves the directory it is relative to."""
    return relative == ".." or relative.startswith("../")


def _check_member(member: tarfile.TarInfo) -> None:
    """Refuse, without touching the filesystem, a member that names or links outside the
    destination, or that is not a file, directory or link."""
    name = member.name
    if not name or "\x00" in name or name.startswith("/") or ".." in name.split("/"):
        raise PathEscape(f"archive member {name!r} is outside the workspace")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise tarfile.SpecialFileError(member)
    if member.issym() or member.islnk():
        link = member.linkname
        if not link or "\x00" in link or link.startswith("/"):
            raise PathEscape(f"archive link {name!r} -> {link!r} points outside the workspace")
        # A symlink is relative to its directory, a hard link to the destination.
        base = posixpath.dirname(name) if member.issym() else ""
        if _climbs_out(posixpath.normpath(posixpath.join(base, link))):
            raise PathEscape(f"archive link {name!r} -> {link!r} points outside the workspace")


def _tree_entries(
    root: str, skip: Callable[[str], bool] | None
) -> tuple[list[str], list[tuple[str, os.stat_result]], list[tuple[str, str]]]:
    """(directories parents first, regular files with their lstat, symlinks with their targets)
    under ``root``, as relative names; links are listed, never followed. Anything else (a fifo, a
    device) is refused as ``put_archive`` refuses it."""
    dirs: list[str] = []
    files: list[tuple[str, os.stat_result]] = []
    links: list[tuple[str, str]] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(f"{root}/{prefix}" if prefix else root) as it:
            for entry in it:
                name = f"{prefix}{entry.name}"
                if skip is not None and skip(name):
                    continue
                if entry.is_symlink():
                    links.append((name, os.readlink(entry.path)))
                elif entry.is_dir(follow_symlinks=False):
                    dirs.append(name)
                    pending.append(f"{name}/")
                elif entry.is_file(follow_symlinks=False):
                    files.append((name, entry.stat(follow_symlinks=False)))
                else:
                    raise SandboxError(f"archive member refused: {name!r} is a special file")
    return dirs, files, links


_umask_value: int | None = None


def _umask() -> int:
    """This process's umask (read once: nothing here changes it), from /proc where there is one;
    else setting it shows it, and it is put back at once."""
    global _umask_value
    if _umask_value is None:
        try:
            with open("/proc/self/status") as fh:
                _umask_value = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _umask_value = os.umask(0o22)
            os.umask(_umask_value)
    return _umask_value


# Listings of templates (immutable once built) by the caller's key: see LocalHandle.copy_tree.
_listings: dict[object, tuple] = {}
LISTINGS_KEPT = 16


def _copy_file(source: str, dest: str, info: os.stat_result) -> None:
    """One regular file, with the mode tarfile's ``data`` filter gives it and its mtime."""
    mode = info.st_mode & 0o755
    if not mode & 0o100:
        mode &= ~0o111
    mode |= 0o600
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            left = info.st_size
            while left > 0:
                copied = os.copy_file_range(src, dst, left)
                if copied == 0:  # the file shrank since it was listed (it should never change)
                    break
                left -= copied
            if mode & _umask():
                os.fchmod(dst, mode)  # what the umask took from it
            os.utime(dst, ns=(info.st_mtime_ns, info.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)


class LocalHandle:
    def __init__(self, sandbox_id: str, directory: Path, *, isolated: bool, network: str, env: dict):
        self.id = sandbox_id
        self.directory = directory
        self.host_workspace = Path(realpath(f"{directory}/workspace"))
        self.isolated = isolated
        self.network = network
        self.env = dict(env)
        self.workspace = SANDBOX_WORKSPACE if isolated else str(self.host_workspace)

    def __repr__(self) -> str:
        return f"<LocalHandle {self.id} isolated={self.isolated}>"

    # --- paths ----------------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """The real host path for a workspace path; PathEscape when it resolves outside.

        Symlinks are followed (``os.path.realpath``) before the containment check, including the
        parents of a file that does not exist yet, so a link pointing out cannot be written through.
        """
        if not isinstance(path, str) or not path or "\x00" in path:
            raise SandboxError(f"invalid path {path!r}")
        shown = path
        if path.startswith("/"):
            inner = PurePosixPath(os.path.normpath(path))
            try:
                path = str(inner.relative_to(self.workspace))
            except ValueError:
                raise PathEscape(
                    f"{shown!r} is outside the workspace: use a path relative to the workspace "
                    f"or under {self.workspace}"
                ) from None
        real = Path(realpath(f"{self.host_workspace}/{path}"))
        if real != self.host_workspace and self.host_workspace not in real.parents:
            raise PathEscape(f"{shown!r} is outside the workspace ({self.workspace})")
        return real

    def _relative(self, real: Path) -> str:
        return real.relative_to(self.host_workspace).as_posix() or "."

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
        if not argv or not all(isinstance(a, str) for a in argv):
            raise SandboxError("exec needs a non-empty list of strings")
        if not self.host_workspace.is_dir():
            raise SandboxError(f"sandbox {self.id} has no workspace any more")
        host_cwd = self.resolve(cwd or ".")
        if not host_cwd.is_dir():
            raise SandboxError(f"working directory {cwd!r} is not a directory in the workspace")
        timeout = float(timeout if timeout is not None else settings.SANDBOX_EXEC_TIMEOUT)
        if timeout <= 0:
            raise SandboxError("exec timeout must be positive")
        child_env = _minimal_env(self.workspace, self.env, env)
        if self.isolated:
            bwrap = shutil.which("bwrap")
            if bwrap is None:
                raise SandboxError("bubblewrap (bwrap) is no longer installed on this worker")
            inner_cwd = str(PurePosixPath(SANDBOX_WORKSPACE) / self._relative(host_cwd))
            # bwrap's own environment is the child's: /proc/1/environ inside must hold no secrets.
            argv = [*_bwrap_args(bwrap, self.host_workspace, self.network, inner_cwd), "--", *argv]
        return run_process(
            list(argv), cwd=str(host_cwd), env=child_env, timeout=timeout, on_output=on_output, cancel=cancel
        )

    # --- files ----------------------------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        real = self.resolve(path)
        try:
            return real.read_bytes()
        except FileNotFoundError:
            raise SandboxError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise SandboxError(f"{path} is a directory") from None
        except OSError as exc:
            raise SandboxError(f"cannot read {path}: {exc.strerror or exc}") from None

    def write_file(self, path: str, data: bytes) -> None:
        real = self.resolve(path)
        if real == self.host_workspace:
            raise SandboxError("cannot write to the workspace directory itself")
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            # Re-check: mkdir may have walked through something created meanwhile.
            self.resolve(str(real.relative_to(self.host_workspace)))
            real.write_bytes(data)
        except IsADirectoryError:
            raise SandboxError(f"{path} is a directory") from None
        except OSError as exc:
            raise SandboxError(f"cannot write {path}: {exc.strerror or exc}") from None

    def list_files(self, path: str = ".") -> list[str]:
        real = self.resolve(path)
        if real.is_file():
            return [self._relative(real)]
        if not real.is_dir():
            raise SandboxError(f"no such file or directory: {path}")
        found: list[str] = []
        for top, dirs, files in os.walk(real):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            base = Path(top)
            for name in sorted(files):
                found.append(self._relative(base / name))
                if len(found) >= LIST_FILES_LIMIT:
                    return sorted(found)
            # Symlinks to directories are listed as entries, never followed.
            for name in list(dirs):
                if (base / name).is_symlink():
                    dirs.remove(name)
                    found.append(self._relative(base / name))
        return sorted(found)[:LIST_FILES_LIMIT]

    def put_archive(self, path: str, data: bytes) -> None:
        """Unpack a tar archive under ``path``; PathEscape (and nothing written) for a member whose
        name or link target leaves the destination, SandboxError for special files.

        Every member is checked lexically before anything is written (absolute names, ``..``,
        absolute links, links whose target climbs out); then tarfile's ``data`` filter checks each
        member's real path as it is extracted, which catches what only the filesystem knows: links
        already in the workspace, and links made by earlier members of the same archive.
        """
        dest = self.resolve(path)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SandboxError(f"cannot create {path}: {exc.strerror or exc}") from None
        try:
            with tarfile.open(fileobj=BytesIO(data), mode="r:") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member)
                tar.extractall(dest, members=members, filter="data")
        except tarfile.SpecialFileError as exc:
            raise SandboxError(f"archive member refused: {exc}") from None
        except tarfile.FilterError as exc:
            raise PathEscape(f"archive member refused: {exc}") from None
        except tarfile.TarError as exc:
            raise SandboxError(f"not a valid tar archive: {exc}") from None
        except OSError as exc:
            raise SandboxError(f"cannot extract the archive: {exc.strerror or exc}") from None

    def copy_tree(
        self,
        source: Path,
        skip: Callable[[str], bool] | None = None,
        files: dict[str, bytes] | None = None,
        listing_key: object = None,
    ) -> bool:
        """Copy ``source``, a directory the worker made (a repository template), into the workspace
        while it is still empty, then write ``files`` (relative name: contents) over it: what
        ``put_archive`` of their tar does (same modes, file mtimes, links kept as links and checked
        the same way), without building or parsing a tar.

        Files are copied by the kernel (``copy_file_range``), never hard-linked: the template is
        shared by every sandbox of that commit and no sandbox may change it. Entries whose
        relative name ``skip`` is true for are left out (with what is under them).

        Returns False, having written nothing, when the workspace is not empty: what is there may be
        links the sandbox made, and ``put_archive`` checks every member against those. In an empty
        workspace nothing is written through a link: directories and files come first (the
        workspace then holds nothing else), links last. A link is checked lexically before anything
        is written, and where it really leads once all are made (PathEscape, as ``put_archive``).

        ``listing_key``: ``source`` does not change while the key stays the same (a template whose
        key says which build it is), so what is in it is listed once per process, not per copy.
        """
        if not self.host_workspace.is_dir():
            raise SandboxError(f"sandbox {self.id} has no workspace any more")
        with os.scandir(self.host_workspace) as it:
            if next(it, None) is not None:
                return False
        files = files or {}
        listing = _listings.get(listing_key) if listing_key is not None else None
        if listing is None:
            listing = _tree_entries(str(source), skip)
            if listing_key is not None:
                while len(_listings) >= LISTINGS_KEPT:
                    del _listings[next(iter(_listings))]
                _listings[listing_key] = listing
        dirs, copies, links = listing
        if files:  # what is written over the tree replaces it, and what is under it
            over = tuple(f"{name}/" for name in files)
            dirs = [name for name in dirs if name not in files and not name.startswith(over)]
            copies = [c for c in copies if c[0] not in files and not c[0].startswith(over)]
            links = [x for x in links if x[0] not in files and not x[0].startswith(over)]
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            _check_member(info)
        for name in files:
            _check_member(tarfile.TarInfo(name))
        root, workspace = str(source), str(self.host_workspace)
        try:
            made = {""}
            for name in dirs:
                os.mkdir(f"{workspace}/{name}")
                made.add(name)
            for name, info in copies:
                _copy_file(f"{root}/{name}", f"{workspace}/{name}", info)
            for name, data in files.items():
                path = f"{workspace}/{name}"
                parent = posixpath.dirname(name)
                if parent not in made:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    while parent not in made:
                        made.add(parent)
                        parent = posixpath.dirname(parent)
                fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
                )
                with open(fd, "wb") as fh:
                    if 0o644 & _umask():
                        os.fchmod(fd, 0o644)
                    fh.write(data)
            for name, target in links:
                os.symlink(target, f"{workspace}/{name}")
        except OSError as exc:
            raise SandboxError(
                f"cannot copy the repository into the workspace: {exc.strerror or exc}"
            ) from None
        for name, target in links:
            real = os.path.realpath(f"{workspace}/{name}")
            if real != workspace and not real.startswith(workspace + "/"):
                raise PathEscape(f"archive link {name!r} -> {target!r} points outside the workspace")
        return True

    def tree_stamp(self) -> tuple | None:
        """What the workspace's files are, cheaply (names, modes, sizes, times, inodes, link
        targets; ``.git`` left out as the diff leaves it out): equal stamps mean the files did not
        change in between, so the runner need not pull the workspace out to diff it again.

        None when that cannot be told: a special file, or a file changed in the same tick of the
        filesystem's clock as the stamp (a marker beside the workspace, touched first, tells which;
        git calls such entries "racily clean"), whose next change might leave its times as they are.
        """
        marker = self.directory / STAMP_FILE
        try:
            marker.touch()  # an existing one gets the time now
            now = marker.stat().st_ctime_ns
            _dirs, files, links = _tree_entries(
                str(self.host_workspace), lambda name: name == ".git" or name.startswith(".git/")
            )
        except (OSError, SandboxError):
            return None
        entries = []
        for name, info in files:
            if info.st_ctime_ns >= now or info.st_mtime_ns >= now:
                return None
            entries.append(
                (name, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
            )
        return (tuple(sorted(entries)), tuple(sorted(links)))

    def get_archive(self, path: str = ".") -> bytes:
        real = self.resolve(path)
        if not real.exists():
            raise SandboxError(f"no such file or directory: {path}")
        buffer = BytesIO()
        try:
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
                if real.is_dir():
                    for entry in sorted(os.listdir(real)):
                        tar.add(real / entry, arcname=entry)  # symlinks stay symlinks
                else:
                    tar.add(real, arcname=real.name)
        except OSError as exc:
            raise SandboxError(f"cannot archive {path}: {exc.strerror or exc}") from None
        return buffer.getvalue()


class LocalProvider:
    name = "local"

    def __init__(self, root: str | Path | None = None, isolation: str | None = None):
        self.root = Path(root if root is not None else settings.SANDBOX_ROOT)
        self.isolation = isolation or settings.SANDBOX_ISOLATION
        if self.isolation not in ("auto", "bwrap", "none"):
            raise SandboxError(f"unknown sandbox isolation {self.isolation!r}: use auto, bwrap or none")

    def _isolation(self) -> tuple[bool, str]:
        """(use bubblewrap, reason when not) for the configured mode."""
        if self.isolation == "none":
            return False, ISOLATION_OFF_REASON
        works, reason = probe_bwrap()
        if works:
            return True, ""
        if self.isolation == "bwrap":
            raise SandboxError(
                f"DEPUTIES_SANDBOX_ISOLATION=bwrap, but {reason}; "
                "install bubblewrap or choose another isolation mode"
            )
        return False, f"{reason}: {UNISOLATED}"

    def capabilities(self) -> Capabilities:
        try:
            isolated, reason = self._isolation()
        except SandboxError as exc:
            return Capabilities(isolated=False, network_policy=False, resource_limits=False, reason=str(exc))
        return Capabilities(
            isolated=isolated,
            network_policy=isolated,
            resource_limits=False,
            reason=reason,
            # Unisolated, every sandbox (and /proc) of every team is readable by every command:
            # secrets only when the operator said so by switching isolation off explicitly.
            secrets_allowed=isolated or self.isolation == "none",
        )

    def create(self, spec: SandboxSpec) -> LocalHandle:
        isolated, _ = self._isolation()
        if spec.network not in ("none", "bridge"):
            raise SandboxError(f"unknown network policy {spec.network!r}: use none or bridge")
        sandbox_id = f"s{spec.session_id}-{secrets.token_hex(4)}"
        directory = self.root / sandbox_id
        try:
            try:
                os.mkdir(directory)
            except FileNotFoundError:  # the first sandbox under this root
                self.root.mkdir(parents=True, exist_ok=True)
                os.mkdir(directory)
            os.mkdir(directory / "workspace", 0o700)
            # Names only: the values may be secrets, and nothing on disk may hold one.
            meta = {"session_id": spec.session_id, "network": spec.network, "env_names": sorted(spec.env)}
            fd = os.open(directory / METADATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(meta, fh)
        except OSError as exc:
            raise SandboxError(f"cannot create the sandbox directory under {self.root}: {exc}") from exc
        return LocalHandle(sandbox_id, directory, isolated=isolated, network=spec.network, env=spec.env)

    def connect(self, sandbox_id: str, env: dict[str, str] | None = None) -> LocalHandle:
        _check_sandbox_id(sandbox_id)
        directory = self.root / sandbox_id
        if not (directory / "workspace").is_dir():
            raise SandboxError(f"sandbox {sandbox_id} does not exist")
        try:
            meta = json.loads((directory / METADATA_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SandboxError(f"sandbox {sandbox_id} has no readable metadata: {exc}") from exc
        if "env" in meta:  # written by an older version, values included: keep the names only
            meta["env_names"] = sorted(meta.pop("env") or {})
            _rewrite(directory / METADATA_FILE, meta)
        isolated, _ = self._isolation()
        return LocalHandle(
            sandbox_id, directory, isolated=isolated, network=meta.get("network", "none"), env=env or {}
        )

    def destroy(self, sandbox_id: str) -> None:
        _check_sandbox_id(sandbox_id)
        directory = self.root / sandbox_id
        if not directory.exists() and not directory.is_symlink():
            return

        def make_writable_and_retry(func, path, _exc):
            # The sandboxed code may have left read-only directories behind.
            os.chmod(os.path.dirname(path), stat.S_IRWXU)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, stat.S_IRWXU)
            func(path)

        try:
            if directory.is_symlink():
                directory.unlink()
            else:
                shutil.rmtree(directory, onerror=make_writable_and_retry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SandboxError(f"cannot remove sandbox {sandbox_id}: {exc}") from exc

    def logs(self, sandbox_id: str, tail: int = 500) -> SandboxLogs:
        _check_sandbox_id(sandbox_id)
        directory = self.root / sandbox_id
        workspace = directory / "workspace"
        details = {"directory": str(directory), "workspace": str(workspace)}
        if not workspace.is_dir():
            details["workspace exists"] = "no"
            return SandboxLogs(
                exists=False,
                summary=(
                    f"the workspace {workspace} does not exist on this host: destroyed or removed "
                    "(local sandboxes live on the worker host that created them)"
                ),
                details=details,
                note=NO_ENGINE_LOGS,
            )
        details["workspace exists"] = "yes"
        details["size"] = _disk_usage(workspace)
        try:
            meta = json.loads((directory / METADATA_FILE).read_text())
        except (OSError, ValueError) as exc:
            details["metadata"] = f"unreadable: {exc}"
        else:
            details["network"] = str(meta.get("network", "none"))
            names = meta.get("env_names") or sorted(meta.get("env") or {})  # "env": an older version's
            details["environment variables"] = ", ".join(names) or "none"
        caps = self.capabilities()
        details["isolation now"] = "bubblewrap" if caps.isolated else f"none: {caps.reason}"
        return SandboxLogs(
            exists=True,
            summary=f"workspace on the worker host at {workspace}",
            details=details,
            note=NO_ENGINE_LOGS,
        )

    def health(self) -> dict:
        result = {"ok": True, "provider": self.name, "isolated": False, "reason": "", "root": str(self.root)}
        try:
            isolated, reason = self._isolation()
            result.update(isolated=isolated, reason=reason)
        except SandboxError as exc:
            result.update(ok=False, reason=str(exc))
            return result
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            result.update(ok=False, reason=f"cannot create the sandbox root {self.root}: {exc}")
            return result
        if not os.access(self.root, os.W_OK | os.X_OK):
            result.update(ok=False, reason=f"the sandbox root {self.root} is not writable")
        return result

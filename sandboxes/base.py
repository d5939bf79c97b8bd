"""The sandbox provider interface. The worker drives sandboxes only through this.

Paths given to a handle are relative to the workspace root, or absolute paths under
``handle.workspace`` (the path the sandboxed process sees). Anything that resolves outside the
workspace -- ``..``, other absolute paths, symlinks pointing out -- raises ``PathEscape``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

# list_files returns at most this many entries; callers tell the model when a listing hits it.
LIST_FILES_LIMIT = 2000
# A cancelled command reports what a shell reports for SIGKILL: 128 + 9.
CANCELLED_EXIT_CODE = 137


class SandboxError(Exception):
    """A sandbox operation failed; the message is safe to show to users."""


class PathEscape(SandboxError):
    """A path resolved outside the workspace."""


@dataclass
class SandboxSpec:
    session_id: int
    image: str = ""
    # Given to every command's process only, never written anywhere by a provider: it may hold
    # secrets. ``connect(id, env=...)`` supplies it again to a handle for a live sandbox.
    env: dict[str, str] = field(default_factory=dict)
    network: str = "none"  # "none" or "bridge"
    cpu_limit: float | None = None
    memory_mb: int | None = None
    pids_limit: int | None = 512
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    duration: float = 0.0
    cancelled: bool = False  # killed (or never started) because its ``Cancel`` was set

    @property
    def output(self) -> str:
        """stdout then stderr, as a person would want to read them."""
        if self.stdout and self.stderr:
            return f"{self.stdout.rstrip()}\n{self.stderr}"
        return self.stdout or self.stderr


# on_output(stream_name, text) where stream_name is "stdout" or "stderr".
OutputCallback = Callable[[str, str], None]


class Cancel:
    """A one-way switch that stops commands: set it from any thread, and every command running
    under it is killed at once, and any later one does not start.

    This is the sandbox interface's only cancellation mechanism: ``exec(..., cancel=...)``. A
    provider registers how to kill the command it just started with ``on_set``; ``set`` calls every
    registered kill on the setting thread, under the lock, so no kill runs after its ``on_set``
    block has ended (a local provider's pid may be reused by then). A kill must therefore be quick,
    or hand its work to a thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._kills: dict[int, Callable[[], None]] = {}
        self._next = 0

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            kills, self._kills = list(self._kills.values()), {}
            for kill in kills:
                try:
                    kill()
                except Exception:  # the others must still be killed
                    log.exception("killing a cancelled command failed")

    @contextmanager
    def on_set(self, kill: Callable[[], None]) -> Iterator[Callable[[], bool]]:
        """Call ``kill`` when (or, if already, as soon as) this is set, until the block ends.

        Yields ``fired()``: whether ``kill`` was called for this block, so a command that ended on
        its own just before a cancel is not reported as cancelled.
        """
        fired = threading.Event()

        def firing() -> None:
            fired.set()
            kill()

        with self._lock:
            now = self._set
            if not now:
                key, self._next = self._next, self._next + 1
                self._kills[key] = firing
        if now:
            firing()
        try:
            yield fired.is_set
        finally:
            if not now:
                with self._lock:
                    self._kills.pop(key, None)


@dataclass
class LogLine:
    stream: str  # "stdout" or "stderr"
    text: str


@dataclass
class SandboxLogs:
    """What a provider itself knows about one sandbox, for operators (the admin's logs page).

    ``exists`` is False when the provider has nothing by that id any more (destroyed, or removed
    behind our back); ``summary`` then says so in words. ``details`` are facts in display order
    (state, exit code, paths...). ``lines`` is the engine's own output of the sandbox, oldest first,
    at most the ``tail`` asked for; ``note`` explains what the lines are, or why there are none.
    """

    exists: bool
    summary: str
    details: dict[str, str] = field(default_factory=dict)
    lines: list[LogLine] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class Capabilities:
    isolated: bool
    network_policy: bool
    resource_limits: bool
    reason: str = ""  # why not isolated, shown in the UI and API
    # Whether sandbox-visible environment secrets may be given to this provider's sandboxes:
    # isolated ones, or unisolated when the operator explicitly accepted it
    # (DEPUTIES_SANDBOX_ISOLATION=none). The runner withholds them otherwise.
    secrets_allowed: bool = False
    # Whether create may take long (an image pull): the runner then shows a ``creating`` row while
    # it runs. Other sandboxes get their row once, when they are ready.
    slow_create: bool = False


def secrets_withheld_reason(caps: Capabilities) -> str:
    """Why an unisolated sandbox gets none of the environment's secrets, with the fix, in one line."""
    return (
        f"the sandbox is not isolated ({caps.reason or 'no isolation available'}), so any command "
        "could read other sessions' sandboxes and processes; install bubblewrap on the worker host, "
        "use DEPUTIES_SANDBOX_PROVIDER=docker, or set DEPUTIES_SANDBOX_ISOLATION=none to accept "
        "giving secrets to unisolated sandboxes (single-user trials only)"
    )


class SandboxHandle(Protocol):
    id: str
    workspace: str  # the workspace path as seen inside the sandbox

    def exec(
        self,
        argv: list[str],
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        cancel: Cancel | None = None,
    ) -> ExecResult:
        """Run ``argv`` to its end, its timeout, or ``cancel`` being set.

        A set ``cancel`` kills the command and whatever it started (``cancelled=True``,
        ``exit_code=CANCELLED_EXIT_CODE``); a command under a ``cancel`` set already never starts.
        """
        ...

    def read_file(self, path: str) -> bytes: ...

    def write_file(self, path: str, data: bytes) -> None: ...

    def list_files(self, path: str = ".") -> list[str]:
        """Files under ``path``, recursively, as sorted workspace-relative paths.

        ``.git`` directories are skipped and at most ``LIST_FILES_LIMIT`` entries come back.
        """
        ...

    def put_archive(self, path: str, data: bytes) -> None:
        """Extract an uncompressed tar stream at ``path`` (relative to the workspace)."""
        ...

    def get_archive(self, path: str = ".") -> bytes:
        """A tar stream of ``path`` (relative to the workspace).

        Member names are relative to ``path``: a directory's entries without a leading ``./``, or a
        file's base name; so ``put_archive(dest, get_archive(src))`` copies ``src`` into ``dest``.
        """
        ...


class SandboxProvider(Protocol):
    name: str

    def capabilities(self) -> Capabilities: ...

    def create(self, spec: SandboxSpec) -> SandboxHandle: ...

    def connect(self, sandbox_id: str, env: dict[str, str] | None = None) -> SandboxHandle:
        """A handle for a live sandbox; ``env`` is what ``spec.env`` was (providers keep no values)."""
        ...

    def destroy(self, sandbox_id: str) -> None:
        """Idempotent: destroying a missing sandbox is not an error."""
        ...

    def health(self) -> dict: ...

    def logs(self, sandbox_id: str, tail: int = 500) -> SandboxLogs:
        """The provider's view of a sandbox, for operators: never raises for a missing sandbox."""
        ...


def get_provider(name: str | None = None) -> SandboxProvider:
    from django.conf import settings

    name = name or settings.SANDBOX_PROVIDER
    if name == "local":
        from sandboxes.providers.local import LocalProvider

        return LocalProvider()
    if name == "docker":
        from sandboxes.providers.docker import DockerProvider  # type: ignore[import-not-found]

        return DockerProvider()
    raise SandboxError(f"unknown sandbox provider {name!r}")

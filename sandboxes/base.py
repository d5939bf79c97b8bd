"""The sandbox provider interface. The worker drives sandboxes only through this.

Paths given to a handle are relative to the workspace root, or absolute paths under
``handle.workspace`` (the path the sandboxed process sees). Anything that resolves outside the
workspace -- ``..``, other absolute paths, symlinks pointing out -- raises ``PathEscape``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# list_files returns at most this many entries; callers tell the model when a listing hits it.
LIST_FILES_LIMIT = 2000


class SandboxError(Exception):
    """A sandbox operation failed; the message is safe to show to users."""


class PathEscape(SandboxError):
    """A path resolved outside the workspace."""


@dataclass
class SandboxSpec:
    session_id: int
    image: str = ""
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

    @property
    def output(self) -> str:
        """stdout then stderr, as a person would want to read them."""
        if self.stdout and self.stderr:
            return f"{self.stdout.rstrip()}\n{self.stderr}"
        return self.stdout or self.stderr


# on_output(stream_name, text) where stream_name is "stdout" or "stderr".
OutputCallback = Callable[[str, str], None]


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
    ) -> ExecResult: ...

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

    def connect(self, sandbox_id: str) -> SandboxHandle: ...

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

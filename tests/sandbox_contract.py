"""What every sandbox provider must do, as a pytest class to subclass.

    class TestMyProvider(SandboxContract):
        @pytest.fixture
        def provider(self, settings, tmp_path):
            return MyProvider(...)

Everything runs real processes. Isolation checks skip, naming the provider's own reason, when the
provider reports ``isolated=False``; hiding the worker's environment holds for every provider.
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings

from sandboxes.base import CANCELLED_EXIT_CODE, Cancel, ExecResult, PathEscape, SandboxError, SandboxSpec

REPO_DIR = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float = 5.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.02)


def live_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` and that are not zombies."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def unique_sleep() -> str:
    """A sleep duration nobody else uses, so the test can find its own processes in /proc."""
    return f"100.{secrets.randbelow(10**8):08d}"


def make_tar(entries: list[tuple[str, bytes | None, str | None, bytes]]) -> bytes:
    """entries: (name, data for a file, or None with a link target, tar type)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, link, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.DIRTYPE:
                info.mode = 0o755
                tar.addfile(info)
            elif link is not None:
                info.linkname = link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data or b""))
    return buffer.getvalue()


def read_tar(data: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        out: dict[str, bytes | None] = {}
        for member in tar.getmembers():
            fh = tar.extractfile(member) if member.isfile() else None
            out[member.name] = fh.read() if fh else None
        return out


def shell(handle, script: str, **kwargs) -> ExecResult:
    return handle.exec(["sh", "-c", script], **kwargs)


class SandboxContract:
    """Subclasses supply a ``provider`` fixture; every test here then runs against it."""

    @pytest.fixture
    def provider(self):
        raise NotImplementedError("subclass SandboxContract and supply a `provider` fixture")

    @pytest.fixture
    def sandbox(self, provider):
        handle = provider.create(SandboxSpec(session_id=7))
        yield handle
        provider.destroy(handle.id)

    @pytest.fixture
    def isolated(self, provider):
        caps = provider.capabilities()
        if not caps.isolated:
            pytest.skip(f"provider {provider.name!r} is not isolated: {caps.reason}")
        return caps

    # --- exec ---------------------------------------------------------------------------------

    def test_it_returns_stdout_and_the_exit_code(self, sandbox):
        result = shell(sandbox, "echo hello; exit 3")
        assert (result.exit_code, result.stdout, result.timed_out) == (3, "hello\n", False)

    def test_it_keeps_stderr_separate(self, sandbox):
        result = shell(sandbox, "echo out; echo err >&2")
        assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)
        assert result.output == "out\nerr\n"

    def test_it_streams_output_while_the_command_runs(self, sandbox):
        # The command only finishes once the callback has seen its first line and answered
        # through the workspace, so this passes only if output arrives before the exit.
        seen: list[tuple[str, str]] = []

        def on_output(stream: str, text: str) -> None:
            seen.append((stream, text))
            if "ready" in text:
                sandbox.write_file("go", b"")

        script = "echo ready; echo warn >&2; while [ ! -e go ]; do sleep 0.01; done; echo done"
        result = shell(sandbox, script, timeout=20, on_output=on_output)
        assert not result.timed_out
        assert result.stdout == "ready\ndone\n"
        assert "".join(t for s, t in seen if s == "stdout") == "ready\ndone\n"
        assert "".join(t for s, t in seen if s == "stderr") == "warn\n"

    def test_it_decodes_invalid_utf8_with_replacement_characters(self, sandbox):
        result = shell(sandbox, r"printf 'caf\303\251 \377\n'")
        assert result.stdout == "café \ufffd\n"

    def test_it_runs_in_a_workspace_relative_cwd(self, sandbox):
        sandbox.write_file("sub/dir/keep", b"")
        result = sandbox.exec(["pwd"], cwd="sub/dir")
        assert result.stdout.strip() == sandbox.workspace.rstrip("/") + "/sub/dir"
        assert sandbox.exec(["pwd"]).stdout.strip() == sandbox.workspace

    def test_it_refuses_a_cwd_outside_the_workspace(self, sandbox):
        with pytest.raises(PathEscape):
            sandbox.exec(["pwd"], cwd="../..")
        with pytest.raises(PathEscape):
            sandbox.exec(["pwd"], cwd="/etc")

    def test_it_gives_the_command_a_minimal_environment_plus_what_was_asked(self, provider):
        handle = provider.create(SandboxSpec(session_id=7, env={"FROM_SPEC": "spec"}))
        try:
            result = handle.exec(["env"], env={"FROM_CALL": "call"})
        finally:
            provider.destroy(handle.id)
        env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        assert env["FROM_SPEC"] == "spec"
        assert env["FROM_CALL"] == "call"
        assert env["HOME"] == handle.workspace
        assert "PATH" in env

    def test_it_never_passes_the_workers_environment(self, sandbox, monkeypatch):
        secret = "s3cret-" + secrets.token_hex(8)
        monkeypatch.setenv("DEPUTIES_CONTRACT_SECRET", secret)
        result = sandbox.exec(["env"])
        assert result.exit_code == 0
        assert secret not in result.stdout
        assert "DEPUTIES_CONTRACT_SECRET" not in result.stdout
        for name in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV"):
            assert f"{name}=" not in result.stdout

    def test_it_kills_the_whole_process_tree_on_timeout(self, sandbox):
        marker = unique_sleep()
        started = time.monotonic()
        result = shell(sandbox, f"sleep {marker} & sleep {marker}", timeout=0.5)
        assert time.monotonic() - started < 5
        assert result.timed_out
        assert result.exit_code == 124
        wait_until(lambda: not live_processes_with(marker), message="the sleeps to be killed")

    def test_it_kills_the_whole_process_tree_within_two_seconds_of_a_cancel(self, sandbox):
        marker = unique_sleep()
        cancel = Cancel()
        cancelled_at: list[float] = []

        def cancel_once_running() -> None:
            wait_until(lambda: len(live_processes_with(marker)) >= 2, timeout=30, message="the sleeps")
            cancelled_at.append(time.monotonic())
            cancel.set()

        thread = threading.Thread(target=cancel_once_running)
        thread.start()
        result = shell(sandbox, f"echo started; sleep {marker} & sleep {marker}", timeout=120, cancel=cancel)
        returned = time.monotonic()
        thread.join()
        assert (result.cancelled, result.timed_out, result.exit_code) == (True, False, CANCELLED_EXIT_CODE)
        assert result.stdout == "started\n"
        assert returned - cancelled_at[0] < 2, (
            f"exec returned {returned - cancelled_at[0]:.2f} s after the cancel"
        )
        wait_until(lambda: not live_processes_with(marker), timeout=0.5, message="the sleeps to be killed")
        assert shell(sandbox, "echo still usable").stdout == "still usable\n"  # the sandbox itself lives

    def test_it_starts_nothing_under_a_cancel_already_set(self, sandbox):
        cancel = Cancel()
        cancel.set()
        result = shell(sandbox, "touch ran", cancel=cancel)
        assert (result.cancelled, result.exit_code) == (True, CANCELLED_EXIT_CODE)
        assert shell(sandbox, "test -e ran").exit_code != 0

    def test_it_does_not_call_a_command_that_ended_on_its_own_cancelled(self, sandbox):
        cancel = Cancel()
        result = shell(sandbox, "echo done", cancel=cancel)
        cancel.set()
        assert (result.cancelled, result.exit_code, result.stdout) == (False, 0, "done\n")

    def test_it_does_not_wait_for_background_processes_holding_the_output(self, sandbox):
        marker = unique_sleep()
        started = time.monotonic()
        result = shell(sandbox, f"sleep {marker} & echo started", timeout=30)
        assert time.monotonic() - started < 5
        assert (result.exit_code, result.stdout, result.timed_out) == (0, "started\n", False)
        wait_until(lambda: not live_processes_with(marker), message="the background sleep to end")

    def test_it_waits_for_a_command_that_closed_its_output(self, sandbox):
        result = shell(sandbox, "exec >&- 2>&-; sleep 0.2; touch late", timeout=30)
        assert result.exit_code == 0
        assert sandbox.read_file("late") == b""

    def test_it_reports_a_missing_program_as_a_failure(self, sandbox):
        result = sandbox.exec(["sh", "-c", "no-such-program-here"])
        assert result.exit_code == 127

    # --- files --------------------------------------------------------------------------------

    def test_it_round_trips_binary_files_with_unicode_names(self, sandbox):
        data = bytes(range(256)) * 8
        name = "dïr/ünïcødé ☃.bin"
        sandbox.write_file(name, data)
        assert sandbox.read_file(name) == data
        assert name in sandbox.list_files()
        assert shell(sandbox, "wc -c < 'dïr/ünïcødé ☃.bin'").stdout.strip() == str(len(data))

    def test_it_accepts_absolute_paths_under_the_workspace(self, sandbox):
        sandbox.write_file(sandbox.workspace.rstrip("/") + "/abs.txt", b"x")
        assert sandbox.read_file("abs.txt") == b"x"

    def test_it_sees_files_written_by_commands(self, sandbox):
        shell(sandbox, "mkdir -p a && printf made > a/f.txt")
        assert sandbox.read_file("a/f.txt") == b"made"

    def test_it_lists_files_sorted_relative_and_without_git(self, sandbox):
        for name in ("b.txt", "a/z.txt", "a/b/c.txt", ".git/config", "sub/.git/HEAD", ".env"):
            sandbox.write_file(name, b"")
        assert sandbox.list_files() == sorted([".env", "a/b/c.txt", "a/z.txt", "b.txt"])
        assert sandbox.list_files("a") == ["a/b/c.txt", "a/z.txt"]

    def test_it_reports_missing_files(self, sandbox):
        with pytest.raises(SandboxError):
            sandbox.read_file("missing.txt")

    def test_it_round_trips_archives(self, sandbox):
        data = make_tar(
            [
                ("pkg", None, None, tarfile.DIRTYPE),
                ("pkg/mod.py", b"print('hi')\n", None, tarfile.REGTYPE),
                ("pkg/ünï.bin", bytes(range(256)), None, tarfile.REGTYPE),
                ("pkg/link", None, "mod.py", tarfile.SYMTYPE),
                ("top.txt", b"top", None, tarfile.REGTYPE),
            ]
        )
        sandbox.put_archive("dest", data)
        assert sandbox.read_file("dest/pkg/mod.py") == b"print('hi')\n"
        assert sandbox.read_file("dest/pkg/link") == b"print('hi')\n"
        back = read_tar(sandbox.get_archive("dest"))
        assert back["top.txt"] == b"top"
        assert back["pkg/ünï.bin"] == bytes(range(256))
        assert "pkg" in back and "pkg/link" in back
        sandbox.put_archive("copy", sandbox.get_archive("dest/pkg"))
        assert sandbox.read_file("copy/mod.py") == b"print('hi')\n"
        assert read_tar(sandbox.get_archive("dest/top.txt")) == {"top.txt": b"top"}

    # --- paths --------------------------------------------------------------------------------

    @pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "a/../../x", "link/passwd"])
    def test_it_refuses_paths_outside_the_workspace(self, sandbox, path):
        sandbox.exec(["ln", "-s", "/etc", "link"])
        with pytest.raises(PathEscape):
            sandbox.read_file(path)
        with pytest.raises(PathEscape):
            sandbox.write_file(path, b"owned")
        with pytest.raises(PathEscape):
            sandbox.list_files(path)
        with pytest.raises(PathEscape):
            sandbox.get_archive(path)
        with pytest.raises(PathEscape):
            sandbox.put_archive(path, make_tar([("f", b"owned", None, tarfile.REGTYPE)]))

    def test_it_refuses_reading_through_a_symlinked_directory(self, sandbox):
        sandbox.exec(["ln", "-s", "/etc", "etc-link"])
        with pytest.raises(PathEscape):
            sandbox.read_file("etc-link/passwd")
        with pytest.raises(PathEscape):
            sandbox.read_file("etc-link")
        with pytest.raises(PathEscape):
            sandbox.write_file("etc-link/new-file", b"owned")

    @pytest.mark.parametrize(
        "entries",
        [
            [("../evil", b"owned", None, tarfile.REGTYPE)],
            [("/tmp/evil", b"owned", None, tarfile.REGTYPE)],
            [("ok/../../evil", b"owned", None, tarfile.REGTYPE)],
            [("up", None, "../..", tarfile.SYMTYPE)],
            [("abs", None, "/etc", tarfile.SYMTYPE)],
            [("hard", None, "../../etc/passwd", tarfile.LNKTYPE)],
            [("a", None, ".", tarfile.SYMTYPE), ("a/b", None, "../..", tarfile.SYMTYPE)],
        ],
        ids=["dotdot", "absolute", "nested-dotdot", "symlink-up", "symlink-abs", "hardlink", "chain"],
    )
    def test_it_refuses_archive_members_that_escape(self, sandbox, entries):
        with pytest.raises(PathEscape):
            sandbox.put_archive("in", make_tar(entries))

    # --- lifecycle ----------------------------------------------------------------------------

    def test_it_connects_to_an_existing_sandbox(self, provider, sandbox):
        sandbox.write_file("note.txt", b"kept")
        again = provider.connect(sandbox.id)
        assert again.id == sandbox.id
        assert again.read_file("note.txt") == b"kept"
        assert shell(again, "cat note.txt").stdout == "kept"

    def test_it_is_given_the_environment_again_on_connect_and_keeps_no_values(self, provider):
        value = "canary-" + secrets.token_hex(8)
        handle = provider.create(SandboxSpec(session_id=7, env={"API_TOKEN": value}))
        try:
            script = 'echo "t=${API_TOKEN:-unset}"'
            assert shell(handle, script).stdout == f"t={value}\n"
            assert shell(provider.connect(handle.id), script).stdout == "t=unset\n"  # nothing kept to restore
            again = provider.connect(handle.id, env={"API_TOKEN": value})
            assert shell(again, script).stdout == f"t={value}\n"
        finally:
            provider.destroy(handle.id)

    def test_it_destroys_idempotently(self, provider):
        handle = provider.create(SandboxSpec(session_id=8))
        provider.destroy(handle.id)
        provider.destroy(handle.id)
        with pytest.raises(SandboxError):
            provider.connect(handle.id)

    def test_it_reports_health(self, provider):
        health = provider.health()
        assert health["ok"] is True
        assert health["provider"] == provider.name
        assert health["isolated"] == provider.capabilities().isolated

    def test_it_explains_missing_isolation(self, provider):
        caps = provider.capabilities()
        assert caps.isolated or "without isolation" in caps.reason

    # --- isolation (skipped, with the provider's reason, when it is not isolated) -------------

    def test_it_hides_the_control_planes_files(self, sandbox, isolated):
        for path in (REPO_DIR, Path(settings.DATA_DIR), Path.home(), Path(settings.SANDBOX_ROOT)):
            result = sandbox.exec(["test", "-e", str(path)])
            assert result.exit_code != 0, f"{path} is visible inside the sandbox"
        assert shell(sandbox, f"cat {REPO_DIR}/manage.py").exit_code != 0

    def test_it_hides_the_workers_environment_from_proc(self, sandbox, isolated, monkeypatch):
        secret = "s3cret-" + secrets.token_hex(8)
        monkeypatch.setenv("DEPUTIES_CONTRACT_SECRET", secret)
        result = shell(sandbox, "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'")
        assert "PATH=" in result.stdout  # it could read some environments: its own
        assert secret not in result.stdout

    def test_it_only_writes_inside_the_workspace(self, sandbox, isolated):
        assert shell(sandbox, "touch /usr/owned").exit_code != 0
        assert shell(sandbox, "touch /etc/owned").exit_code != 0
        assert shell(sandbox, "echo temp > /tmp/t && cat /tmp/t").stdout == "temp\n"
        assert shell(sandbox, "test -e /tmp/t").exit_code != 0  # /tmp does not persist
        assert shell(sandbox, "echo kept > k && cat k").stdout == "kept\n"

    def test_it_has_no_network_when_the_policy_is_none(self, sandbox, isolated):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the host can
            for target in (port, 5432):
                result = sandbox.exec(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{target}"], timeout=10)
                assert result.exit_code != 0, f"the sandbox reached 127.0.0.1:{target}"

    def test_it_has_network_when_the_policy_is_bridge(self, provider, isolated):
        if not isolated.network_policy:
            pytest.skip(f"provider {provider.name!r} does not enforce network policies")
        handle = provider.create(SandboxSpec(session_id=9, network="bridge"))
        try:
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen()
                port = listener.getsockname()[1]
                result = handle.exec(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], timeout=10)
                assert result.exit_code == 0, result.stderr
                # connect() remembers the policy
                again = provider.connect(handle.id)
                result = again.exec(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], timeout=10)
                assert result.exit_code == 0, result.stderr
        finally:
            provider.destroy(handle.id)

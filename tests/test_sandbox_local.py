"""The local provider: the shared contract with and without bubblewrap, plus what only it promises."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from sandboxes.base import PathEscape, SandboxError, SandboxSpec, get_provider
from sandboxes.providers.local import LocalProvider
from tests.live import wait_for
from tests.sandbox_contract import SandboxContract, make_tar


@pytest.fixture
def no_isolation(settings, tmp_path) -> LocalProvider:
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "none"
    return LocalProvider()


@pytest.fixture
def with_bwrap(settings, tmp_path) -> LocalProvider:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed here; CI installs it")
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "bwrap"
    return LocalProvider()


@pytest.fixture
def without_bwrap_on_path(monkeypatch, tmp_path):
    """A worker host where bwrap is not installed: nothing on PATH has it."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


class TestLocalWithBubblewrap(SandboxContract):
    @pytest.fixture
    def provider(self, with_bwrap):
        return with_bwrap


class TestLocalWithoutIsolation(SandboxContract):
    @pytest.fixture
    def provider(self, no_isolation):
        return no_isolation


def test_it_is_the_default_provider(settings, tmp_path):
    settings.SANDBOX_PROVIDER = "local"
    settings.SANDBOX_ROOT = tmp_path
    assert isinstance(get_provider(), LocalProvider)
    assert get_provider().name == "local"


def test_it_lays_out_one_directory_per_sandbox(no_isolation, settings):
    handle = no_isolation.create(SandboxSpec(session_id=42))
    assert handle.id.startswith("s42-")
    workspace = Path(settings.SANDBOX_ROOT) / handle.id / "workspace"
    assert workspace.is_dir()
    assert handle.workspace == os.path.realpath(workspace)
    no_isolation.destroy(handle.id)
    assert not (Path(settings.SANDBOX_ROOT) / handle.id).exists()


def test_it_shows_the_workspace_at_a_fixed_path_under_bubblewrap(with_bwrap):
    handle = with_bwrap.create(SandboxSpec(session_id=1))
    assert handle.workspace == "/workspace"
    assert handle.exec(["pwd"]).stdout == "/workspace\n"
    assert with_bwrap.capabilities().isolated
    assert with_bwrap.capabilities().network_policy


def test_it_drops_every_capability_under_bubblewrap(with_bwrap):
    # The worker may run as root; inside, root must not be able to mount the host disk back in.
    handle = with_bwrap.create(SandboxSpec(session_id=1))
    status = handle.exec(["cat", "/proc/self/status"]).stdout
    assert "CapEff:\t0000000000000000" in status
    assert "CapBnd:\t0000000000000000" in status
    assert handle.exec(["mount", "-t", "tmpfs", "none", "/usr"]).exit_code != 0


def test_it_says_plainly_when_isolation_is_off(no_isolation):
    caps = no_isolation.capabilities()
    assert (caps.isolated, caps.network_policy, caps.resource_limits) == (False, False, False)
    assert "without isolation" in caps.reason
    assert no_isolation.health()["isolated"] is False


def test_it_falls_back_without_isolation_when_bwrap_is_missing(settings, tmp_path, without_bwrap_on_path):
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "auto"
    provider = LocalProvider()
    caps = provider.capabilities()
    assert caps.isolated is False
    assert caps.reason == (
        "bubblewrap (bwrap) is not installed: commands run on the worker host without isolation"
    )
    health = provider.health()
    assert (health["ok"], health["isolated"], health["reason"]) == (True, False, caps.reason)
    handle = provider.create(SandboxSpec(session_id=1))
    assert handle.workspace.startswith(str(tmp_path))


def test_it_refuses_to_run_unisolated_when_bwrap_is_required(settings, tmp_path, without_bwrap_on_path):
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "bwrap"
    provider = LocalProvider()
    with pytest.raises(SandboxError, match="bubblewrap \\(bwrap\\) is not installed"):
        provider.create(SandboxSpec(session_id=1))
    assert provider.health()["ok"] is False
    assert "install bubblewrap" in provider.health()["reason"]
    assert provider.capabilities().isolated is False


def test_it_uses_bubblewrap_automatically_when_it_works(settings, tmp_path):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed here; CI installs it")
    settings.SANDBOX_ROOT = tmp_path / "sandboxes"
    settings.SANDBOX_ISOLATION = "auto"
    assert LocalProvider().capabilities().isolated is True


@pytest.mark.parametrize("bad_id", ["../etc", "a/b", "", ".hidden", "x" * 200])
def test_it_refuses_malformed_sandbox_ids(no_isolation, bad_id):
    with pytest.raises(SandboxError):
        no_isolation.connect(bad_id)
    with pytest.raises(SandboxError):
        no_isolation.destroy(bad_id)


def test_it_reports_a_missing_sandbox(no_isolation):
    with pytest.raises(SandboxError, match="does not exist"):
        no_isolation.connect("s1-00000000")
    no_isolation.destroy("s1-00000000")


def test_it_destroys_read_only_trees_left_by_the_sandbox(no_isolation, settings):
    handle = no_isolation.create(SandboxSpec(session_id=1))
    assert handle.exec(["sh", "-c", "mkdir -p ro/deep && touch ro/deep/f && chmod -R a-w ro"]).exit_code == 0
    no_isolation.destroy(handle.id)
    assert not (Path(settings.SANDBOX_ROOT) / handle.id).exists()


def files_holding(root: Path, value: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and value.encode() in p.read_bytes()]


def test_it_writes_the_envs_names_but_never_its_values(no_isolation, settings):
    value = "canary-" + os.urandom(8).hex()
    handle = no_isolation.create(SandboxSpec(session_id=1, env={"API_TOKEN": value, "GREETING": "hi"}))
    assert handle.exec(["sh", "-c", "echo $API_TOKEN"]).stdout == f"{value}\n"
    meta = Path(handle.host_workspace).parent / "sandbox.json"
    assert meta.stat().st_mode & 0o077 == 0
    assert json.loads(meta.read_text())["env_names"] == ["API_TOKEN", "GREETING"]
    assert files_holding(Path(settings.SANDBOX_ROOT), value) == []
    assert no_isolation.logs(handle.id).details["environment variables"] == "API_TOKEN, GREETING"


def test_it_drops_the_values_an_older_version_wrote_when_it_connects(no_isolation, settings):
    value = "canary-" + os.urandom(8).hex()
    handle = no_isolation.create(SandboxSpec(session_id=1))
    meta = Path(handle.host_workspace).parent / "sandbox.json"
    meta.write_text(json.dumps({"session_id": 1, "network": "none", "env": {"API_TOKEN": value}}))
    again = no_isolation.connect(handle.id, env={"API_TOKEN": value})
    assert again.exec(["sh", "-c", "echo $API_TOKEN"]).stdout == f"{value}\n"
    assert json.loads(meta.read_text()) == {"session_id": 1, "network": "none", "env_names": ["API_TOKEN"]}
    assert files_holding(Path(settings.SANDBOX_ROOT), value) == []


def test_it_writes_nothing_outside_the_workspace(no_isolation, tmp_path):
    handle = no_isolation.create(SandboxSpec(session_id=1))
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, handle.host_workspace / "out")
    before = sorted(tmp_path.rglob("*"))
    for path in ("out/x", "../x", "../../x", str(outside / "x"), "out/new/dir/x"):
        with pytest.raises(PathEscape):
            handle.write_file(path, b"owned")
    archives = [
        make_tar([("../x", b"owned", None, tarfile.REGTYPE)]),
        make_tar([("out/x", b"owned", None, tarfile.REGTYPE)]),
        make_tar([("l", None, "../..", tarfile.SYMTYPE), ("l/x", b"owned", None, tarfile.REGTYPE)]),
        make_tar([("h", None, "../../outside/y", tarfile.LNKTYPE)]),
    ]
    for data in archives:
        with pytest.raises(PathEscape):
            handle.put_archive(".", data)
    after = sorted(p for p in tmp_path.rglob("*") if handle.host_workspace not in p.parents)
    assert [p for p in after if p not in before and p != handle.host_workspace] == []
    assert list(outside.iterdir()) == []


def test_it_reports_signals_like_a_shell(no_isolation):
    handle = no_isolation.create(SandboxSpec(session_id=1))
    assert handle.exec(["sh", "-c", "kill -TERM $$"]).exit_code == 128 + 15


def test_it_ends_the_call_when_the_callback_fails(no_isolation):
    handle = no_isolation.create(SandboxSpec(session_id=1))

    def explode(stream, text):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        handle.exec(["sh", "-c", "echo hi; sleep 100"], timeout=30, on_output=explode)


def settled_stamp(handle):
    """The workspace's stamp once the filesystem's clock has moved past its last change."""
    return wait_for(handle.tree_stamp, timeout=10, interval=0.01, what="a stamp past the last change")


def test_it_stamps_the_workspace_the_same_until_a_file_changes(no_isolation):
    handle = no_isolation.create(SandboxSpec(session_id=1))
    handle.write_file("a.txt", b"one\n")
    handle.write_file("sub/b.txt", b"two\n")
    first = settled_stamp(handle)
    assert handle.tree_stamp() == first
    handle.write_file(".git/HEAD", b"ref: refs/heads/x\n")  # the diff leaves .git out, so does the stamp
    handle.write_file(".git/objects/ab/cd", b"x")
    assert settled_stamp(handle) == first
    changes = [
        lambda: handle.write_file("a.txt", b"ONE\n"),  # same size
        lambda: os.chmod(handle.host_workspace / "a.txt", 0o755),
        lambda: os.utime(handle.host_workspace / "a.txt", ns=(0, 0)),
        lambda: os.rename(handle.host_workspace / "sub", handle.host_workspace / "dir"),
        lambda: os.symlink("a.txt", handle.host_workspace / "link"),
        lambda: handle.write_file("new.txt", b""),
        lambda: os.unlink(handle.host_workspace / "new.txt"),
    ]
    seen = [first]
    for change in changes:
        change()
        seen.append(settled_stamp(handle))
        assert seen[-1] != seen[-2]
    assert seen[-1] == seen[-3]  # new.txt made and removed: the files are as they were


def test_it_cannot_stamp_a_workspace_whose_file_changed_within_the_stamps_tick(no_isolation):
    """A file changed no earlier than the stamp could change again without its times moving (the
    filesystem's clock ticks coarsely): no stamp then, so the runner diffs."""
    handle = no_isolation.create(SandboxSpec(session_id=1))
    handle.write_file("a.txt", b"one\n")
    settled_stamp(handle)
    future = time.time_ns() + 3_600 * 10**9
    os.utime(handle.host_workspace / "a.txt", ns=(future, future))
    assert handle.tree_stamp() is None
    os.mkfifo(handle.host_workspace / "pipe")  # nothing the diff would see, but not a file
    os.utime(handle.host_workspace / "a.txt", ns=(0, 0))
    assert handle.tree_stamp() is None

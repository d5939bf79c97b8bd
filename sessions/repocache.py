"""Preparing a repository once per commit, not once per run.

Every new sandbox used to cost a full ``git clone`` into the session's trusted checkout, three more
git commands, and a Python tar of the whole tree *and* its ``.git``: hundreds of milliseconds, most
of a trivial session. Now:

* the tip of the base branch is resolved with one ``git ls-remote`` (so a run still starts from the
  latest push);
* a **template** per (repository, commit) is cloned once on this host, under
  ``DATA_DIR/repo-cache/``, and its tar (tree and ``.git``, HEAD detached) is kept in memory;
* the sandbox gets that tree plus two small files that put it on the session's branch (HEAD and
  packed-refs: no directory per session): a local sandbox by a plain copy of the template's files
  (``upload``), any other provider as that tar;
* the session's trusted checkout is a ``.git`` of a few small files whose objects are the template's
  (``objects/info/alternates``): no copy, no git process. It is what ``collect_diff`` diffs against,
  written only when something first needs it (``Runner.trusted_checkout``); the setup step looks
  for ``.deputies/setup`` in the template.

Templates are immutable (a commit's tree never changes), built in a temporary directory and renamed
into place, so concurrent runs and several worker processes on one host share them safely.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from django.conf import settings

from deputies.paths import realpath

TAR_CACHE_BYTES = 64 * 1024 * 1024  # per process
# Branch names read from ref files (_local_tip); anything else is left to git.
PLAIN_BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")

_build_locks: dict[Path, threading.Lock] = {}
_tars: OrderedDict[Path, bytes] = OrderedDict()
_lock = threading.Lock()


def cache_root() -> Path:
    return Path(settings.DATA_DIR) / "repo-cache"


class _Lookup:
    """One ``git ls-remote``, shared by every run that asked for it before it started."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.commit: str | None = None
        self.error: BaseException | None = None

    def result(self) -> str | None:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.commit


class _Branch:
    def __init__(self) -> None:
        self.running: _Lookup | None = None  # started: may predate a caller's push
        self.next: _Lookup | None = None  # not started yet: fresh for everyone waiting on it


_branches: dict[tuple[str, str], _Branch] = {}


def resolve(url: str, branch: str, env: dict[str, str] | None = None) -> str | None:
    """The commit at the tip of ``branch``, or None when there is no such branch (a tag, say).

    Always a lookup that started after the call (so a run starts from the latest push), but
    concurrent runs share it: while one ``git ls-remote`` is in flight, later callers wait for the
    next one, which then serves them all. Under load that is one process per lookup time, not per run.
    """
    with _lock:
        state = _branches.setdefault((url, branch), _Branch())
        previous = shared = None
        if state.running is None:
            lookup = state.running = _Lookup()
        elif state.next is not None:
            shared = state.next
        else:
            lookup = state.next = _Lookup()
            previous = state.running
    if shared is not None:  # waited for outside the lock
        return shared.result()
    if previous is not None:  # lead the next lookup once the one in flight is done
        previous.done.wait()
        with _lock:
            state.running, state.next = lookup, None
    try:
        lookup.commit = _ls_remote(url, branch, env)
    except BaseException as exc:
        lookup.error = exc
    finally:
        with _lock:
            if state.running is lookup:
                state.running = None
        lookup.done.set()
    return lookup.result()


def _ls_remote(url: str, branch: str, env: dict[str, str] | None = None) -> str | None:
    from sessions.runner import git, repository_source

    source = repository_source(url)
    if source.local and (commit := _local_tip(Path(source.url), branch)) is not None:
        return commit
    out = git("ls-remote", "--", source.url, f"refs/heads/{branch}", source=source, env=env)
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if ref == f"refs/heads/{branch}":
            return sha.strip()
    return None


def _local_tip(path: Path, branch: str) -> str | None:
    """The tip of ``branch`` in a local repository read from its ref files as git reads them (the
    loose ref, else ``packed-refs``), or None when the files do not say for certain (a symbolic
    ref, a linked work tree, reftable, an unusual name, no such branch): then ``ls-remote`` answers.

    ``ls-remote`` on a path is three processes (git, a shell, ``git-upload-pack``) for what two
    small files say; the URL has been checked just before, as for any git command, and nothing of
    the repository is run or followed outside its git directory.
    """
    if not PLAIN_BRANCH.match(branch) or ".." in branch or branch.endswith((".lock", ".")):
        return None
    dot = path / ".git"
    git_dir = dot if dot.is_dir() else path  # a work tree's, or a bare repository
    if os.path.lexists(dot) and git_dir is path:  # .git is a file: a linked work tree, a submodule
        return None
    if (git_dir / "commondir").exists() or (git_dir / "reftable").exists():
        return None
    real_git_dir = realpath(str(git_dir))
    ref = f"refs/heads/{branch}"
    loose = git_dir / ref
    try:
        if not realpath(str(loose)).startswith(real_git_dir + "/"):
            return None
        text = loose.read_text(errors="replace")
    except FileNotFoundError:
        text = None
    except OSError:  # refs/heads is not a directory (reftable's stub), the ref is one...
        return None
    if text is None:
        try:
            if not realpath(str(git_dir / "packed-refs")).startswith(real_git_dir + "/"):
                return None
            packed = (git_dir / "packed-refs").read_text(errors="replace")
        except OSError:
            return None
        text = ""
        for line in packed.splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                text = sha
                break
    commit = text.strip()
    return commit if COMMIT.match(commit) else None


def template(url: str, branch: str, commit: str, env: dict[str, str] | None = None) -> Path:
    """The clone of ``url`` at ``commit`` (HEAD detached), made once per host. ``env`` carries a
    private remote's credentials for git (never written into the clone's config)."""
    from sessions.runner import git, repository_source

    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = cache_root() / f"{key}-{commit}"
    if path.is_dir():
        os.utime(path)  # in use: the reaper removes templates unused for a while and unreferenced
        return path
    with _lock:
        build_lock = _build_locks.setdefault(path, threading.Lock())
    with build_lock:
        if path.is_dir():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
        try:
            tree = tmp / "tree"
            # --no-local: objects arrive as one pack even from a local path (fewer files to upload);
            # --template=: no sample hooks.
            source = repository_source(url)
            git(
                "clone", "--quiet", "--no-local", "--template=", "--no-checkout", "--branch", branch,
                "--", source.url, str(tree), source=source, env=env,
            )  # fmt: skip
            git("checkout", "--quiet", "--detach", commit, cwd=tree)
            # Every ref in packed-refs and no empty directory: each directory is a mkdir, each
            # loose ref a file, in every sandbox made from this template (upload).
            git("pack-refs", "--all", cwd=tree)
            for empty in ("refs/heads", "refs/tags", "objects/info"):
                try:
                    os.rmdir(tree / ".git" / empty)
                except OSError:  # not empty, or not there
                    pass
            try:
                os.rename(tree, path)
            except OSError:  # another worker process on this host finished first
                if not path.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def template_tar(path: Path) -> bytes:
    """The template as tar members without the end-of-archive marker (so more can follow)."""
    with _lock:
        data = _tars.get(path)
        if data is not None:
            _tars.move_to_end(path)
            return data
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT)
    for entry in sorted(os.listdir(path)):
        tar.add(path / entry, arcname=entry, filter=_upload_filter)
    data = buffer.getvalue()[: tar.offset]
    tar.close()
    with _lock:
        _tars[path] = data
        while sum(len(v) for v in _tars.values()) > TAR_CACHE_BYTES and len(_tars) > 1:
            _tars.popitem(last=False)
    return data


def _skipped(name: str) -> bool:
    # HEAD and packed-refs come per session (session_refs); the clone's reflogs mean nothing in the
    # sandbox.
    return name in (".git/HEAD", ".git/packed-refs") or name.startswith(".git/logs")


def _upload_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if _skipped(info.name) else info


_packed: OrderedDict[tuple, tuple[str, dict[str, str], frozenset[str]]] = OrderedDict()
PACKED_KEPT = 16


def _template_key(path: Path) -> tuple:
    """Which build of the template this is: a template removed and built again (the reaper's
    sweep, then a new run of that commit) has a new ``.git`` directory."""
    git_dir = os.stat(path / ".git")
    return (str(path), git_dir.st_dev, git_dir.st_ino, git_dir.st_mtime_ns)


def session_refs(path: Path, key: tuple, branch: str, commit: str, base_ref: str) -> list[tuple[str, str]]:
    """The files that put a template's ``.git`` on the session's branch (and ``base_ref``): HEAD,
    and the template's ``packed-refs`` with both refs added (git reads packed refs as it reads
    loose ones, and writes loose ones over them): no directory or ref file per session. A ref the
    template keeps loose (one built before templates packed theirs) would hide a packed one of the
    same name, so that one is written loose too."""
    with _lock:
        known = _packed.get(key)
    if known is None:
        try:
            text = (path / ".git" / "packed-refs").read_text()
        except FileNotFoundError:
            text = ""
        header, entries, name = "", {}, None
        for line in text.splitlines(keepends=True):
            if line.startswith("#"):
                header += line
            elif line.startswith("^") and name is not None:  # the peeled value of the tag above
                entries[name] += line
            elif line.strip():
                name = line.rstrip("\n").partition(" ")[2]
                entries[name] = line
        refs = path / ".git" / "refs"
        loose = frozenset(
            f"{os.path.relpath(top, path / '.git')}/{name}"
            for top, _, names in os.walk(refs)
            for name in names
        )
        known = (header, entries, loose)
        with _lock:
            _packed[key] = known
            while len(_packed) > PACKED_KEPT:
                _packed.popitem(last=False)
    header, entries, loose = known
    ours = {f"refs/heads/{branch}": f"{commit} refs/heads/{branch}\n", base_ref: f"{commit} {base_ref}\n"}
    merged = {**entries, **ours}
    packed = header + "".join(merged[name] for name in sorted(merged, key=str.encode))  # git's order
    files = [(".git/HEAD", f"ref: refs/heads/{branch}\n"), (".git/packed-refs", packed)]
    files += [(f".git/{name}", f"{commit}\n") for name in ours if name in loose]
    return files


def member(name: str, text: str) -> bytes:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def sandbox_tar(path: Path, branch: str, commit: str, base_ref: str) -> bytes:
    """The template's tar on ``branch`` (and ``base_ref``) at ``commit``, ready for put_archive."""
    refs = session_refs(path, _template_key(path), branch, commit, base_ref)
    # Loose as well: a workspace the image filled may hold loose refs that would hide packed ones.
    refs += [(f".git/{name}", f"{commit}\n") for name in (f"refs/heads/{branch}", base_ref)]
    members = [member(name, text) for name, text in dict(refs).items()]
    return b"".join([template_tar(path), *members, b"\0" * (2 * tarfile.BLOCKSIZE)])


def upload(handle, path: Path, branch: str, commit: str, base_ref: str) -> None:
    """The template on ``branch`` at ``commit`` into a new sandbox's workspace.

    A provider whose workspace is on this host's filesystem copies the template's files straight
    in (``copy_tree``: local sandboxes), which costs a few system calls per file instead of a tar
    built, parsed and checked per session; any other gets the cached tar (``put_archive``).
    """
    copy_tree = getattr(handle, "copy_tree", None)
    if copy_tree is not None:
        key = _template_key(path)
        refs = {name: text.encode() for name, text in session_refs(path, key, branch, commit, base_ref)}
    if copy_tree is None or not copy_tree(path, skip=_skipped, files=refs, listing_key=key):
        handle.put_archive(".", sandbox_tar(path, branch, commit, base_ref))


def write_checkout(checkout: Path, path: Path, branch: str, commit: str, base_ref: str) -> None:
    """A trusted ``.git`` borrowing the template's objects; ``checkout`` must not exist, its parent
    must. Both refs go in ``packed-refs``: git reads them as it reads loose ones (and writes loose
    ones over them), for two directories fewer per session."""
    git_dir = checkout / ".git"
    for directory in (checkout, git_dir, git_dir / "objects", git_dir / "objects" / "info", git_dir / "refs"):
        os.mkdir(directory)
    (git_dir / "objects" / "info" / "alternates").write_text(f"{path / '.git' / 'objects'}\n")
    (git_dir / "config").write_text("[core]\n\trepositoryformatversion = 0\n\tbare = false\n")
    (git_dir / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
    refs = sorted({f"refs/heads/{branch}", base_ref})  # sorted by bytes, as git keeps them
    (git_dir / "packed-refs").write_text("".join(f"{commit} {ref}\n" for ref in refs))

"""What a repository URL may name: checked when it is submitted and again just before git uses it.

A repository URL is handed to ``git`` on the worker, with the worker's credentials and network, so
it is as dangerous as a callback URL and more: ``/etc`` or ``file:///proc/self`` would have the
worker read its own host, ``ssh://-oProxyCommand=...`` would run a command, and
``http://169.254.169.254/`` would fetch cloud credentials. The rules:

* **Local paths** (``/path`` or ``file:///path``) only when ``DEPUTIES_ALLOW_LOCAL_REPOSITORIES``
  is on (Simple mode's default), only when the path, resolved (symlinks, ``..``), lies under one of
  ``DEPUTIES_LOCAL_REPOSITORY_ROOTS`` and not inside Deputies' own data (sandboxes, checkouts,
  the repository cache, media: other sessions' work), and only when it is a git repository. A path
  outside the roots is refused before anything about it is looked at, so the answer says nothing
  about what exists elsewhere on the host.
* **Remote URLs**: https, ssh (also ``user@host:path``) and git, with the address rules of
  deputies/netguard.py (``DEPUTIES_REPOSITORY_ALLOWED_NETWORKS`` opens refused ranges); plain http
  only to hosts inside that allow list.

The worker checks again before every git command that talks to a repository (DNS may have changed,
an old row may predate the rules, the settings may have), and git then runs with only that
repository's transport allowed (``CheckedRepository.git_config``); for http(s) the connection is
pinned to the addresses just checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.conf import settings

from deputies.netguard import Address, UnsafeAddress, check_git_remote
from deputies.paths import realpath


class RepositoryRefused(ValueError):
    """The URL may not be used as a repository; the message says why (and which setting decides)."""


@dataclass(frozen=True)
class CheckedRepository:
    """A repository URL that passed the rules just now, and how git may reach it."""

    url: str  # what to store and hand to git: a local repository's resolved path, else the URL
    scheme: str  # git's protocol name: file, https, http, ssh or git
    host: str = ""
    port: int = 0
    addresses: tuple[Address, ...] = field(default=())
    pin: bool = False  # host is a name whose addresses git's HTTP connection is pinned to

    @property
    def local(self) -> bool:
        return self.scheme == "file"

    def git_config(self) -> list[str]:
        """``-c`` values for a git command on this repository: this transport and no other (so no
        redirect, submodule or ``insteadOf`` reaches elsewhere), and http(s) pinned to the checked
        addresses without redirects."""
        config = ["protocol.allow=never", f"protocol.{self.scheme}.allow=always"]
        if self.scheme in ("http", "https"):
            config.append("http.followRedirects=false")
            if self.pin:
                shown = ",".join(f"[{ip}]" if ip.version == 6 else str(ip) for ip in self.addresses)
                config.append(f"http.curloptResolve={self.host}:{self.port}:{shown}")
        return config


def is_local(url: str) -> bool:
    return url.startswith("/") or url[:5].lower() == "file:"


def check_repository_url(value: str) -> CheckedRepository:
    """Apply the rules to ``value`` (as submitted or as stored); raise ``RepositoryRefused``."""
    url = value.strip()
    if not url:
        raise RepositoryRefused("Give a clone URL or a path.")
    if is_local(url):
        return _check_local(url)
    if url.startswith(("./", "../", "~")):
        raise RepositoryRefused("A local repository must be given as an absolute path.")
    try:
        remote, addresses = check_git_remote(url, allowed=settings.REPOSITORY_ALLOWED_NETWORKS)
    except UnsafeAddress as exc:
        raise RepositoryRefused(_sentence(str(exc))) from None
    return CheckedRepository(
        url=url,
        scheme=remote.scheme,
        host=remote.host,
        port=remote.connect_port,
        addresses=tuple(addresses),
        pin=not remote.host_is_address,
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _check_local(url: str) -> CheckedRepository:
    if not settings.ALLOW_LOCAL_REPOSITORIES:
        raise RepositoryRefused(
            "Local paths are not accepted on this deployment (DEPUTIES_ALLOW_LOCAL_REPOSITORIES is off); "
            "give an https://, ssh:// or git:// URL."
        )
    if url[:5].lower() == "file:":
        parts = urlsplit(url)
        if parts.netloc or not parts.path.startswith("/"):
            raise RepositoryRefused("A file URL must look like file:///absolute/path (no host).")
        path = unquote(parts.path)
    else:
        path = url
    if "\0" in path:
        raise RepositoryRefused("The path contains a NUL character.")
    resolved = realpath(path)
    roots = [str(root) for root in settings.LOCAL_REPOSITORY_ROOTS]
    if not _under(resolved, roots):
        # Where a link under a root leads is the operator's business to see; elsewhere, say nothing.
        shown = f"{path} (a link to {resolved})" if _under(os.path.normpath(path), roots) else path
        listed = ", ".join(roots) or "none"
        raise RepositoryRefused(
            f"{shown} is not under a local repository root ({listed}); "
            "DEPUTIES_LOCAL_REPOSITORY_ROOTS lists the directories repositories may come from."
        )
    internal = internal_dirs()
    if _under(resolved, internal):
        raise RepositoryRefused(f"{path} is inside Deputies' own data (sandboxes, checkouts, caches).")
    if not os.path.isdir(resolved):
        raise RepositoryRefused(f"{path} is not a directory.")
    git_dirs = _git_dirs(resolved)
    if git_dirs is None:
        raise RepositoryRefused(f"{path} is not a git repository.")
    if not all(_under(d, roots) and not _under(d, internal) for d in git_dirs):
        raise RepositoryRefused(f"{path} keeps its git data outside the local repository roots.")
    return CheckedRepository(url=resolved, scheme="file")


def _under(path: str, roots: list[str]) -> bool:
    """Lexically, whether ``path`` is one of ``roots`` or inside one (``Path.is_relative_to``)."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def internal_dirs() -> list[str]:
    """Where Deputies keeps other sessions' work (workspaces, trusted clones of other teams'
    repositories, artifacts): never a repository, whatever the roots say."""
    data = realpath(str(settings.DATA_DIR))
    return [
        realpath(str(settings.SANDBOX_ROOT)),
        f"{data}/checkouts",
        f"{data}/repo-cache",
        realpath(str(settings.MEDIA_ROOT)),
    ]


def _git_dirs(path: str) -> list[str] | None:
    """The directories git would read for the repository at ``path`` (a work tree's ``.git``, a
    ``gitdir:`` file's target and its ``commondir``, or ``path`` itself when bare), or None."""
    isfile, isdir = os.path.isfile, os.path.isdir
    dot = f"{path}/.git"
    if isfile(dot):  # a linked work tree or a submodule: "gitdir: <path>"
        text = Path(dot).read_text(errors="replace").strip()
        if not text.startswith("gitdir:"):
            return None
        git_dir = realpath(os.path.join(path, text.removeprefix("gitdir:").strip()))
    elif isdir(dot):
        git_dir = realpath(dot)
    elif isfile(f"{path}/HEAD") and isdir(f"{path}/objects") and isdir(f"{path}/refs"):
        git_dir = path
    else:
        return None
    if not isfile(f"{git_dir}/HEAD"):
        return None
    dirs = [git_dir]
    common = f"{git_dir}/commondir"
    if isfile(common):
        dirs.append(realpath(os.path.join(git_dir, Path(common).read_text(errors="replace").strip())))
    return dirs

"""The docker provider: one container per sandbox, on whatever engine ``DOCKER_HOST`` points at.

It speaks the Docker Engine API through the docker SDK (no CLI), so it works against Docker Engine
and against Podman's Docker-compatible API (tests/test_sandbox_docker.py runs on both; Podman 4.3,
rootful, as started by scripts/podman-engine.sh). A sandbox is a container named
``deputies-s<session>-<random>`` (that name is the sandbox id) plus a named volume
``<id>-workspace`` mounted at ``/workspace``; the volume outlives container restarts and is removed
by ``destroy``. Both carry the labels ``deputies.session``, ``deputies.deployment`` and
``deputies.managed=true``: ``connect`` and ``destroy`` refuse anything without this deployment's
labels, and the reaper finds orphans by them.

What the container may do:

* read-only root filesystem; writable are only ``/workspace``, ``/tmp`` (tmpfs) and a 1 MB tmpfs at
  ``/run/deputies`` where exec keeps its bookkeeping;
* every command runs as ``DEPUTIES_DOCKER_USER`` (default 1000:1000), with every capability dropped
  and ``no-new-privileges``; CPU, memory (no swap) and pids limits;
* network ``none`` (loopback only) or the engine's default ``bridge``, per environment.

A container without capabilities cannot ``chown``, yet the fresh volume's root belongs to root. So
``create`` first runs a short-lived init container holding only ``CAP_CHOWN`` (no network) that
hands the volume to the sandbox user, and the sandbox container mounts it with ``nocopy`` so the
engine does not copy the image's ownership back over it.

Exec keeps the local provider's semantics. The command runs under a small ``/bin/sh`` wrapper that
starts it in its own session (``setsid``), waits for it, then kills whatever it left in its process
group, so background processes never outlive the call or hold its output open. On timeout the worker
kills the group from a second exec (the wrapper writes the group id under ``/run/deputies``) and the
result is ``exit_code=124, timed_out=True``; a set ``Cancel`` kills it the same way, from a thread, and
the result is ``exit_code=137, cancelled=True`` (the Engine API has no call to kill an exec: moby
issues #9098 and #35703). ``/tmp`` is emptied when a command ends (unless another
command is still running), as under bubblewrap where each command has its own. The environment is the
image's plus ``HOME=/workspace``, ``LANG``, ``TERM``, the spec's and the call's variables: never the
worker's. The spec's variables (secrets among them) are sent with each exec and kept in the handle's
memory only, never in the container's configuration (which the engine stores on its disk and shows to
anyone who can inspect the container); ``connect(id, env=...)`` is given them again. Output is read from the hijacked exec socket with ``select``, demultiplexed here, so a
silent command is never cut off by the HTTP client's read timeout.

Files go through the archive API. Every path is resolved inside the container by a portable
``realpath -m`` written in ``sh`` (busybox images have no ``realpath -m``), and anything that
resolves outside ``/workspace`` raises ``PathEscape``. Uploaded members are given to the sandbox user
with sane modes; absolute or escaping links, members that go through links and special files are
refused before anything is written. Between resolving and the archive call a command running at the
same moment could swap a directory for a symlink; commands never outlive their exec, so that needs a
concurrent exec, and the engine extracts inside the container's own filesystem, never the host's.
"""

from sandboxes.providers.docker.engine import (
    DEPLOYMENT_LABEL,
    MANAGED_LABEL,
    SESSION_LABEL,
    WORKSPACE,
    engine_client,
)
from sandboxes.providers.docker.handle import DockerHandle
from sandboxes.providers.docker.provider import DockerProvider

__all__ = [
    "DEPLOYMENT_LABEL",
    "MANAGED_LABEL",
    "SESSION_LABEL",
    "WORKSPACE",
    "DockerHandle",
    "DockerProvider",
    "engine_client",
]

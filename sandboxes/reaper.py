"""Destroys sandboxes nobody will use again, and what the control plane forgot about.

Sandboxes stay alive between the runs of a session so follow-ups start fast; that is a cost (a
container, a workspace on disk) paid until the session's idle TTL runs out. ``reap`` runs on a
django-q schedule (see the sandboxes migration that creates it) and:

* destroys READY sandboxes unused for longer than their environment's ``idle_ttl_seconds`` (else
  ``DEPUTIES_SANDBOX_IDLE_TTL``) whose session has no active run;
* destroys orphans: docker containers with this deployment's labels, and directories under
  ``DEPUTIES_SANDBOX_ROOT``, that no live row names (a worker died between ``create`` and saving the
  row, or an earlier ``destroy`` failed); anything younger than ``ORPHAN_GRACE`` is left alone,
  because a sandbox being created right now has no external id on its row yet;
* removes the worker's trusted checkouts (``var/checkouts/session-N``) of sessions with no live
  sandbox and no active run; a later follow-up clones again (``Runner.restore_checkout``).

A row is claimed with a conditional ``update()`` (READY and still idle and no active run) before the
provider is asked to destroy it, so a run starting at the same moment either keeps the sandbox or
sees it destroyed and makes a new one, never a half-destroyed one. If the provider fails, the row
stays destroyed with the error noted, and the orphan sweep retries on the next pass.

Local sandboxes and checkouts live on the worker host, so each worker host reaps only its own disk:
with several hosts, the schedule runs on whichever worker picks it up, and other hosts' leftovers
are found when the schedule lands there (see deploy/README.md).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db.models import Exists, OuterRef
from django.utils import timezone

from sandboxes.base import get_provider
from sandboxes.models import Sandbox
from sessions.models import Run

log = logging.getLogger(__name__)

# A sandbox younger than this is never an orphan: its row may not have its external id yet.
ORPHAN_GRACE = timedelta(minutes=15)
LOCAL_SANDBOX_DIR = re.compile(r"^s[0-9]+-[0-9a-f]{8}$")  # LocalProvider.create's naming
CHECKOUT_DIR = re.compile(r"^session-([0-9]+)$")
LIVE = (Sandbox.Status.CREATING, Sandbox.Status.READY)


@dataclass
class ReapReport:
    idle: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    checkouts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"destroyed {len(self.idle)} idle and {len(self.orphans)} orphaned sandboxes, "
            f"removed {len(self.checkouts)} checkouts"
        )
        return f"{text}; {len(self.errors)} errors" if self.errors else text


def active_run_exists():
    return Exists(Run.objects.filter(session=OuterRef("session"), status__in=Run.ACTIVE))


def idle_ttl(sandbox: Sandbox) -> int:
    env = sandbox.session.environment
    if env is not None and env.idle_ttl_seconds:
        return env.idle_ttl_seconds
    return settings.SANDBOX_IDLE_TTL


def destroy_sandbox(sandbox: Sandbox, reason: str, *, expect_last_used=None) -> bool:
    """Claim the row (READY, not used by an active run) as destroyed, then destroy the sandbox.

    Returns False when the row was not ours to destroy: another reaper got it, a run started, or
    (with ``expect_last_used``) it was used since we looked. Raises what the provider raised, after
    noting it on the row; the orphan sweep retries later.
    """
    now = timezone.now()
    rows = Sandbox.objects.filter(pk=sandbox.pk, status=Sandbox.Status.READY)
    if expect_last_used is not None:
        rows = rows.filter(last_used=expect_last_used)
    claimed = (
        rows.alias(busy=active_run_exists())
        .filter(busy=False)
        .update(status=Sandbox.Status.DESTROYED, destroyed=now)
    )
    if not claimed:
        return False
    log.info("destroying sandbox %s (%s): %s", sandbox.external_id, sandbox.provider, reason)
    try:
        if sandbox.external_id:
            get_provider(sandbox.provider).destroy(sandbox.external_id)
    except Exception as exc:
        Sandbox.objects.filter(pk=sandbox.pk).update(error=f"destroy failed ({reason}): {exc}"[:2000])
        raise
    return True


def reap_idle(report: ReapReport, now=None) -> None:
    now = now or timezone.now()
    candidates = (
        Sandbox.objects.filter(status=Sandbox.Status.READY)
        .alias(busy=active_run_exists())
        .filter(busy=False)
        .select_related("session__environment")
    )
    for sandbox in candidates:
        ttl = idle_ttl(sandbox)
        if sandbox.last_used + timedelta(seconds=ttl) > now:
            continue
        try:
            if destroy_sandbox(sandbox, f"idle for over {ttl} s", expect_last_used=sandbox.last_used):
                report.idle.append(sandbox.external_id or str(sandbox.pk))
        except Exception as exc:
            report.errors.append(f"{sandbox.external_id}: {exc}")


def live_ids(provider: str) -> set[str]:
    return set(
        Sandbox.objects.filter(provider=provider, status__in=LIVE)
        .exclude(external_id="")
        .values_list("external_id", flat=True)
    )


def reap_local_orphans(report: ReapReport, now=None) -> None:
    from sandboxes.providers.local import LocalProvider

    provider = LocalProvider()
    if not provider.root.is_dir():
        return
    cutoff = (now or timezone.now()) - ORPHAN_GRACE
    live = live_ids(provider.name)
    for entry in sorted(provider.root.iterdir()):
        if not LOCAL_SANDBOX_DIR.match(entry.name) or entry.name in live:
            continue
        try:
            if entry.lstat().st_mtime > cutoff.timestamp():
                continue
            # Read the rows again: a sandbox may have become live since the listing.
            if Sandbox.objects.filter(
                provider=provider.name, external_id=entry.name, status__in=LIVE
            ).exists():
                continue
            provider.destroy(entry.name)
            report.orphans.append(entry.name)
        except Exception as exc:
            report.errors.append(f"{entry.name}: {exc}")


def reap_docker_orphans(report: ReapReport, now=None) -> None:
    from sandboxes.providers.docker import DockerProvider

    provider = DockerProvider()
    try:
        containers = provider.managed_sandboxes()
    except Exception as exc:
        report.errors.append(f"docker: {exc}")
        return
    cutoff = (now or timezone.now()) - ORPHAN_GRACE
    live = live_ids(provider.name)
    for container in containers:
        sandbox_id = container["id"]
        if sandbox_id in live or (container.get("created") or 0) > cutoff.timestamp():
            continue
        if Sandbox.objects.filter(provider=provider.name, external_id=sandbox_id, status__in=LIVE).exists():
            continue
        try:
            provider.destroy(sandbox_id)
            report.orphans.append(sandbox_id)
        except Exception as exc:
            report.errors.append(f"{sandbox_id}: {exc}")


def uses_docker() -> bool:
    if settings.SANDBOX_PROVIDER == "docker":
        return True
    return Sandbox.objects.filter(provider="docker").exists()


def reap_checkouts(report: ReapReport) -> None:
    from sessions.runner import checkouts_root

    root = checkouts_root()
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        match = CHECKOUT_DIR.match(entry.name)
        if match is None:
            continue
        session_id = int(match.group(1))
        if Sandbox.objects.filter(session_id=session_id, status__in=LIVE).exists():
            continue
        if Run.objects.filter(session_id=session_id, status__in=Run.ACTIVE).exists():
            continue
        try:
            shutil.rmtree(entry)
            report.checkouts.append(entry.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            report.errors.append(f"{entry}: {exc}")


def reap(now=None) -> ReapReport:
    started = time.monotonic()
    report = ReapReport()
    reap_idle(report, now)
    reap_local_orphans(report, now)
    if uses_docker():
        reap_docker_orphans(report, now)
    reap_checkouts(report)
    for error in report.errors:
        log.warning("reaper: %s", error)
    log.info("reaper: %s in %.1f s", report, time.monotonic() - started)
    return report

"""Destroys sandboxes nobody will use again, and what the control plane forgot about.

Sandboxes stay alive between the runs of a session so follow-ups start fast; that is a cost (a
container, a workspace on disk) paid until the session's idle TTL runs out. ``reap`` runs on a
django-q schedule (see the sandboxes migration that creates it) and:

* destroys READY sandboxes whose session has no active run and that are idle (unused for longer
  than their environment's ``idle_ttl_seconds``, else ``DEPUTIES_SANDBOX_IDLE_TTL``) or expired
  (older than ``DEPUTIES_SANDBOX_MAX_AGE`` however busy they were, or their session is archived);
* marks rows left ``creating`` for longer than ``ORPHAN_GRACE`` as failed (the runner now writes a
  row once the create returned; older versions wrote one before it, and a worker could die between);
* destroys orphans: docker containers with this deployment's labels, and directories under
  ``DEPUTIES_SANDBOX_ROOT``, that no live row names (a worker died between ``create`` and saving the
  row, or an earlier ``destroy`` failed); anything younger than ``ORPHAN_GRACE`` is left alone,
  because a sandbox being created right now has no row yet (the runner writes it once the create
  returns);
* removes the worker's trusted checkouts (``var/checkouts/session-N``, and the ``.template`` link
  next to one) of sessions with no live sandbox and no active run; a later follow-up writes one
  again (``Runner.restore_checkout``).

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
from pathlib import Path

from django.conf import settings
from django.db.models import Exists, OuterRef
from django.utils import timezone

from sandboxes.base import get_provider
from sandboxes.models import Sandbox
from sessions.models import Run, SessionStatus

log = logging.getLogger(__name__)

# A sandbox younger than this is never an orphan: its row may not be written yet.
ORPHAN_GRACE = timedelta(minutes=15)
LOCAL_SANDBOX_DIR = re.compile(r"^s[0-9]+-[0-9a-f]{8}$")  # LocalProvider.create's naming
CHECKOUT_DIR = re.compile(
    r"^session-([0-9]+)(\.template|\.partial)?$"
)  # runner: checkout_dir, template_link, restore_checkout
REPO_TEMPLATE_DIR = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{40}$")  # repocache.template's naming
TEMPLATE_GRACE = timedelta(hours=1)
LIVE = (Sandbox.Status.CREATING, Sandbox.Status.READY)


@dataclass
class ReapReport:
    idle: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    checkouts: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"destroyed {len(self.idle)} idle, {len(self.expired)} expired and {len(self.orphans)} "
            f"orphaned sandboxes, marked {len(self.stuck)} stuck ones failed, "
            f"removed {len(self.checkouts)} checkouts and {len(self.templates)} repository templates"
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
    max_age = timedelta(seconds=settings.SANDBOX_MAX_AGE)
    for sandbox in candidates:
        ttl = idle_ttl(sandbox)
        if sandbox.session.status == SessionStatus.ARCHIVED:
            reason, kept_in = "its session is archived", report.expired
        elif sandbox.created + max_age <= now:
            reason, kept_in = (
                f"older than DEPUTIES_SANDBOX_MAX_AGE ({settings.SANDBOX_MAX_AGE} s)",
                report.expired,
            )
        elif sandbox.last_used + timedelta(seconds=ttl) <= now:
            reason, kept_in = f"idle for over {ttl} s", report.idle
        else:
            continue
        try:
            if destroy_sandbox(sandbox, reason, expect_last_used=sandbox.last_used):
                kept_in.append(sandbox.external_id or str(sandbox.pk))
        except Exception as exc:
            report.errors.append(f"{sandbox.external_id}: {exc}")


def reap_stuck(report: ReapReport, now=None) -> None:
    """Rows left CREATING by a worker that died mid-create: marked failed, so the orphan sweep may
    remove whatever the engine made for them and the admin shows why."""
    cutoff = (now or timezone.now()) - ORPHAN_GRACE
    stuck = (
        Sandbox.objects.filter(status=Sandbox.Status.CREATING, created__lt=cutoff)
        .alias(busy=active_run_exists())
        .filter(busy=False)
    )
    for pk in stuck.values_list("pk", flat=True):
        if (
            Sandbox.objects.filter(pk=pk, status=Sandbox.Status.CREATING)
            .alias(busy=active_run_exists())
            .filter(busy=False)
            .update(status=Sandbox.Status.FAILED, error="The worker stopped while creating this sandbox.")
        ):
            report.stuck.append(str(pk))


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
    entries: dict[int, list] = {}  # a session's checkout and its template link: one check for both
    for entry in sorted(root.iterdir()):
        match = CHECKOUT_DIR.match(entry.name)
        if match is not None:
            entries.setdefault(int(match.group(1)), []).append(entry)
    for session_id, paths in entries.items():
        if Sandbox.objects.filter(session_id=session_id, status__in=LIVE).exists():
            continue
        if Run.objects.filter(session_id=session_id, status__in=Run.ACTIVE).exists():
            continue
        removed = False
        for entry in paths:
            try:
                if entry.is_symlink():
                    entry.unlink()
                else:
                    shutil.rmtree(entry)
                removed = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                report.errors.append(f"{entry}: {exc}")
        if removed:
            report.checkouts.append(f"session-{session_id}")


def reap_repo_cache(report: ReapReport, now=None) -> None:
    """Per-commit repository templates (sessions/repocache.py) that no checkout borrows objects from
    and nobody used for ``TEMPLATE_GRACE``; checkouts are reaped first, so finished sessions free theirs."""
    from sessions.repocache import cache_root
    from sessions.runner import checkouts_root

    root = cache_root()
    if not root.is_dir():
        return
    borrowed = set()
    if checkouts_root().is_dir():
        for checkout in checkouts_root().iterdir():
            try:
                if checkout.is_symlink():  # runner.template_link
                    borrowed.add(str(checkout.readlink()))
                    continue
                text = (checkout / ".git" / "objects" / "info" / "alternates").read_text()
            except OSError:
                continue
            borrowed.update(
                str(Path(line.strip()).parent.parent) for line in text.splitlines() if line.strip()
            )
    cutoff = ((now or timezone.now()) - TEMPLATE_GRACE).timestamp()
    for entry in sorted(root.iterdir()):
        if not REPO_TEMPLATE_DIR.match(entry.name) or str(entry) in borrowed:
            continue
        try:
            if entry.stat().st_mtime > cutoff:
                continue
            shutil.rmtree(entry)
            report.templates.append(entry.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            report.errors.append(f"{entry}: {exc}")


def reap(now=None) -> ReapReport:
    started = time.monotonic()
    report = ReapReport()
    reap_idle(report, now)
    reap_stuck(report, now)
    reap_local_orphans(report, now)
    if uses_docker():
        reap_docker_orphans(report, now)
    reap_checkouts(report)
    reap_repo_cache(report, now)
    for error in report.errors:
        log.warning("reaper: %s", error)
    log.info("reaper: %s in %.1f s", report, time.monotonic() - started)
    return report

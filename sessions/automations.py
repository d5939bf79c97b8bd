"""Automations: sessions started on a schedule, and one-time scheduled follow-ups.

An ``Automation`` is a cron expression in a time zone with what to start (prompt, repository,
environment, model). The worker's scheduler drives them through one django-q2 schedule: every minute
it queues ``sessions.tasks.run_automations``, which calls ``run_due()``. django-q2's own CRON schedules
evaluate cron expressions in one zone (``TIME_ZONE``); our rows keep their own zone, and croniter
computes their next occurrence in it (daylight saving included).

Rules, all decided by ``next_fire_at``, the next occurrence not yet fired:

* Each occurrence is fired once: the conditional update of ``next_fire_at`` is the claim, so two
  workers (or a duplicated task) cannot both fire it.
* Missed occurrences (every worker was down) run once, not N times: the next occurrence is computed
  from *now*, not from the one just fired.
* A session of the previous occurrence still queued or running: the occurrence is skipped, with the
  reason on an ``AutomationFiring`` row (the automation's visible history).
* Paused: nothing fires; resuming starts from the next occurrence after now (no catch-up).

Each fired occurrence is a normal session with source ``schedule``.

A ``ScheduledMessage`` is a follow-up for an existing session, sent once at ``due_at`` ("re-check CI
in 2 hours"), by the same tick; pending ones can be cancelled.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from django.conf import settings
from django.db import models, transaction
from django.utils.timezone import now as current_time

from sessions.models import (
    Environment,
    Message,
    Repository,
    Session,
    SessionStatus,
    Source,
    Team,
    session_model,
    start_session,
)

log = logging.getLogger(__name__)

BUSY = (SessionStatus.QUEUED, SessionStatus.RUNNING)
MAX_PER_TICK = 500  # automations (and scheduled messages) handled by one tick; the rest wait a minute


def cron_problem(expression: str) -> str | None:
    """Why ``expression`` is not a usable five-field cron expression, or None."""
    if len(expression.split()) != 5:
        return "Use five fields: minute hour day-of-month month day-of-week (e.g. '0 9 * * 1-5')."
    if not croniter.is_valid(expression):
        return f"{expression!r} is not a valid cron expression."
    return None


def zone_problem(name: str) -> str | None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"Unknown time zone {name!r}; use an IANA name such as 'Europe/Paris' or 'UTC'."
    return None


def next_occurrence(expression: str, zone: str, after: datetime) -> datetime:
    """The first occurrence strictly after ``after``, evaluated in ``zone``, as a UTC datetime."""
    local = after.astimezone(ZoneInfo(zone))
    return croniter(expression, local).get_next(datetime).astimezone(ZoneInfo("UTC"))


class Automation(models.Model):
    team = models.ForeignKey(Team, models.CASCADE, related_name="automations")
    name = models.CharField(max_length=100)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, models.SET_NULL, null=True, blank=True, related_name="automations"
    )
    cron = models.CharField(
        max_length=100, help_text="Five fields: minute hour day-of-month month day-of-week."
    )
    timezone = models.CharField(max_length=64, default="UTC", help_text="IANA time zone the cron is read in.")
    prompt = models.TextField()
    repository = models.ForeignKey(Repository, models.PROTECT, related_name="automations")
    environment = models.ForeignKey(
        Environment, models.SET_NULL, null=True, blank=True, related_name="automations"
    )
    profile = models.ForeignKey(
        "AgentProfile",
        models.SET_NULL,
        null=True,
        blank=True,
        related_name="automations",
        help_text="The agent profile of its sessions. Empty: the environment's default, then the team's.",
    )
    model = models.CharField(
        max_length=200,
        blank=True,
        help_text="Empty: the profile's, the environment's default, then DEPUTIES_DEFAULT_MODEL.",
    )
    paused = models.BooleanField(default=False)
    next_fire_at = models.DateTimeField(null=True, blank=True, db_index=True, editable=False)
    last_fired_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_session = models.ForeignKey(
        Session, models.SET_NULL, null=True, blank=True, related_name="+", editable=False
    )
    created = models.DateTimeField(default=current_time)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="unique_automation_name_per_team")
        ]

    def __str__(self) -> str:
        return self.name

    def schedule(self, now: datetime | None = None) -> None:
        """Set the next occurrence from ``now`` (on create, edit and resume); the caller saves."""
        self.next_fire_at = (
            None if self.paused else next_occurrence(self.cron, self.timezone, now or current_time())
        )

    def save(self, *args, **kwargs) -> None:
        if self.next_fire_at is None and not self.paused:
            self.schedule()
        super().save(*args, **kwargs)

    def pause(self) -> bool:
        return bool(
            Automation.objects.filter(pk=self.pk, paused=False).update(paused=True, next_fire_at=None)
        )

    def resume(self, now: datetime | None = None) -> bool:
        """Start again from the next occurrence after now: what was missed while paused is not run."""
        nxt = next_occurrence(self.cron, self.timezone, now or current_time())
        changed = Automation.objects.filter(pk=self.pk, paused=True).update(paused=False, next_fire_at=nxt)
        self.refresh_from_db()
        return bool(changed)

    def resolved_model(self) -> str:
        """The model a firing's session runs, in the order every new session gets one."""
        return session_model(self.model, self.profile, self.environment, team=self.team)

    def fire(self, now: datetime) -> AutomationFiring | None:
        """Fire the due occurrence: a new session, or a skip with its reason. None: another worker
        fired it first (or it was paused or edited meanwhile)."""
        due = self.next_fire_at
        nxt = next_occurrence(self.cron, self.timezone, max(now, due))
        with transaction.atomic():
            claimed = Automation.objects.filter(pk=self.pk, paused=False, next_fire_at=due).update(
                next_fire_at=nxt, last_fired_at=now
            )
            if not claimed:
                return None
            self.next_fire_at, self.last_fired_at = nxt, now
            previous = (
                Session.objects.filter(pk=self.last_session_id).values_list("status", flat=True).first()
                if self.last_session_id
                else None
            )
            if previous in BUSY:
                reason = f"skipped: session {self.last_session_id} of the previous run is still {previous}"
                return AutomationFiring.objects.create(
                    automation=self, due_at=due, fired_at=now, skipped=reason
                )
            model = self.resolved_model()
            if not model:
                reason = (
                    "skipped: no model (set one on the automation, its environment or DEPUTIES_DEFAULT_MODEL)"
                )
                return AutomationFiring.objects.create(
                    automation=self, due_at=due, fired_at=now, skipped=reason
                )
            session = start_session(
                team=self.team,
                repository=self.repository,
                prompt=self.prompt,
                model=model,
                created_by=self.created_by,
                environment=self.environment,
                profile=self.profile,
                title=f"{self.name} ({due.astimezone(ZoneInfo(self.timezone)):%Y-%m-%d %H:%M})"[:200],
                source=Source.SCHEDULE,
                external_ref={"automation": self.pk, "due_at": due.isoformat()},
            )
            Automation.objects.filter(pk=self.pk).update(last_session=session)
            self.last_session = session
            return AutomationFiring.objects.create(automation=self, due_at=due, fired_at=now, session=session)


class AutomationFiring(models.Model):
    """One occurrence of an automation: the session it started, or why it was skipped."""

    automation = models.ForeignKey(Automation, models.CASCADE, related_name="firings")
    due_at = models.DateTimeField(help_text="The occurrence (of the cron expression) this fired for.")
    fired_at = models.DateTimeField()
    session = models.ForeignKey(Session, models.SET_NULL, null=True, blank=True, related_name="+")
    skipped = models.CharField(max_length=300, blank=True, help_text="Why no session was started.")

    class Meta:
        ordering = ["-due_at"]
        constraints = [
            models.UniqueConstraint(fields=["automation", "due_at"], name="one_firing_per_occurrence")
        ]

    def __str__(self) -> str:
        return f"{self.automation} at {self.due_at:%Y-%m-%d %H:%M}"


class ScheduledMessage(models.Model):
    """A follow-up sent to its session once, at ``due_at``."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        CANCELLED = "cancelled"
        FAILED = "failed"

    session = models.ForeignKey(Session, models.CASCADE, related_name="scheduled_messages")
    content = models.TextField()
    steer = models.BooleanField(default=False, help_text="Steer a run that is active at that time.")
    due_at = models.DateTimeField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    message = models.ForeignKey(Message, models.SET_NULL, null=True, blank=True, related_name="+")
    error = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, models.SET_NULL, null=True, blank=True)
    created = models.DateTimeField(default=current_time)

    class Meta:
        ordering = ["due_at", "pk"]
        indexes = [models.Index(fields=["status", "due_at"], name="scheduledmessage_due")]

    def __str__(self) -> str:
        return f"follow-up of session {self.session_id} at {self.due_at:%Y-%m-%d %H:%M}"

    def cancel(self) -> bool:
        changed = ScheduledMessage.objects.filter(pk=self.pk, status=self.Status.PENDING).update(
            status=self.Status.CANCELLED
        )
        self.refresh_from_db()
        return bool(changed)

    def deliver(self) -> bool:
        """Send it (once: the conditional update is the claim); an archived session refuses it."""
        with transaction.atomic():
            if not ScheduledMessage.objects.filter(pk=self.pk, status=self.Status.PENDING).update(
                status=self.Status.SENT
            ):
                return False
            session = Session.objects.get(pk=self.session_id)
            if session.status == SessionStatus.ARCHIVED:
                ScheduledMessage.objects.filter(pk=self.pk).update(
                    status=self.Status.FAILED, error="the session is archived"
                )
                return False
            message = session.add_message(self.content, author=self.created_by, steer=self.steer)
            ScheduledMessage.objects.filter(pk=self.pk).update(message=message)
        return True


def run_due(now: datetime | None = None) -> dict[str, int]:
    """Fire every due automation and send every due follow-up (the minute schedule's task).

    ``now`` is the clock (tests pass a frozen one). Each item is its own transaction, so one broken
    row does not hold up the others.
    """
    now = now or current_time()
    counts = {"started": 0, "skipped": 0, "followups": 0}
    due = Automation.objects.filter(paused=False, next_fire_at__lte=now).select_related(
        "team", "repository", "environment", "profile", "created_by"
    )
    for automation in due.order_by("next_fire_at", "pk")[:MAX_PER_TICK]:
        try:
            firing = automation.fire(now)
        except Exception:
            log.exception("automation %s could not fire", automation.pk)
            continue
        if firing is not None:
            counts["skipped" if firing.skipped else "started"] += 1
    pending = ScheduledMessage.objects.filter(status=ScheduledMessage.Status.PENDING, due_at__lte=now)
    for scheduled in pending.order_by("due_at", "pk")[:MAX_PER_TICK]:
        try:
            counts["followups"] += scheduled.deliver()
        except Exception:
            log.exception("scheduled message %s could not be sent", scheduled.pk)
    return counts


def schedule_followup(session: Session, content: str, delay: timedelta, author=None, steer: bool = False):
    return ScheduledMessage.objects.create(
        session=session, content=content, due_at=current_time() + delay, created_by=author, steer=steer
    )

"""The domain: teams, repositories, environments, sessions and everything a run leaves behind.

State transitions live here as model methods so that views, tasks and the admin all go through
the same conditional updates.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from sessions.columns import Columns, exists, prepared_cursor
from sessions.revisions import Revisioned
from sessions.secrets import Secret, decrypt, encrypt


class Team(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=100, unique=True)
    monthly_budget_usd = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="Model spend per calendar month (UTC); runs stop when it is used up. "
        "Empty: DEPUTIES_TEAM_MONTHLY_BUDGET_USD.",
    )
    max_concurrent_runs = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Runs of this team that may run at once; more wait, queued, in order. 0: no limit. "
        "Empty: DEPUTIES_TEAM_MAX_CONCURRENT_RUNS.",
    )
    default_profile = models.ForeignKey(
        "AgentProfile",
        models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The agent profile of sessions that name none and whose environment has none.",
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        _check_profile_team(self.default_profile, self.pk)

    def concurrency_limit(self) -> int:
        """Runs this team may have running at once; 0 is no limit."""
        if self.max_concurrent_runs is not None:
            return self.max_concurrent_runs
        return settings.TEAM_MAX_CONCURRENT_RUNS


def _check_profile_team(profile: AgentProfile | None, team_id: int | None) -> None:
    """A default agent profile must be one of the same team's (the admin lists every team's)."""
    from django.core.exceptions import ValidationError

    if profile is not None and profile.team_id != team_id:
        raise ValidationError({"default_profile": f"Profile {profile.name!r} belongs to another team."})


class Role(models.TextChoices):
    OWNER = "owner"
    MEMBER = "member"
    VIEWER = "viewer"


WRITE_ROLES = (Role.OWNER, Role.MEMBER)


class Membership(models.Model):
    team = models.ForeignKey(Team, models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="one_membership_per_team")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class Repository(models.Model):
    class Provider(models.TextChoices):
        GITHUB = "github"
        GIT = "git"
        LOCAL = "local"

    team = models.ForeignKey(Team, models.CASCADE, related_name="repositories")
    name = models.CharField(max_length=200)
    url = models.CharField(max_length=1000, help_text="Clone URL or a local path on the worker host.")
    default_branch = models.CharField(max_length=200, default="main")
    provider = models.CharField(max_length=10, choices=Provider.choices, default=Provider.GIT)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "repositories"
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="unique_repository_name_per_team"),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """The repository URL rules (sessions/repository_urls.py), for model forms such as the admin."""
        from sessions.repository_urls import RepositoryRefused, check_repository_url

        try:
            self.url = check_repository_url(self.url).url
        except RepositoryRefused as exc:
            raise ValidationError({"url": str(exc)}) from None

    @staticmethod
    def provider_for(url: str) -> str:
        from deputies.netguard import UnsafeAddress, parse_git_remote
        from sessions.repository_urls import is_local

        if is_local(url) or url.startswith(("./", "../")):
            return Repository.Provider.LOCAL
        try:
            host = parse_git_remote(url).host
        except UnsafeAddress:
            host = ""
        # By host, not by substring: a GitHub token must never go to evil.example/github.com/x.
        return Repository.Provider.GITHUB if host == "github.com" else Repository.Provider.GIT


class Environment(Revisioned, models.Model):
    class Network(models.TextChoices):
        NONE = "none"
        BRIDGE = "bridge"

    team = models.ForeignKey(Team, models.CASCADE, related_name="environments")
    name = models.CharField(max_length=100)
    revision = models.PositiveIntegerField(default=1)
    image = models.CharField(max_length=300, blank=True, help_text="Container image (docker provider).")
    setup_script = models.TextField(
        blank=True,
        help_text="Shell commands run (sh) in each new sandbox, before the repository's .deputies/setup.",
    )
    env_vars = models.JSONField(default=dict, blank=True, help_text="Non-secret variables for the sandbox.")
    sandbox_provider = models.CharField(max_length=20, blank=True, help_text="Empty: the deployment default.")
    network_policy = models.CharField(max_length=10, choices=Network.choices, default=Network.NONE)
    cpu_limit = models.FloatField(null=True, blank=True)
    memory_mb = models.PositiveIntegerField(null=True, blank=True)
    timeout_seconds = models.PositiveIntegerField(default=3600)
    idle_ttl_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Destroy a session's sandbox after this long unused. Empty: the deployment default "
        "(DEPUTIES_SANDBOX_IDLE_TTL).",
    )
    default_model = models.CharField(max_length=200, blank=True)
    default_profile = models.ForeignKey(
        "AgentProfile",
        models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The agent profile of sessions in this environment that name none.",
    )
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="unique_environment_name_per_team"),
        ]

    def __str__(self) -> str:
        return f"{self.name} (r{self.revision})"

    def clean(self) -> None:
        _check_profile_team(self.default_profile, self.team_id)

    def decrypted_secrets(self) -> list[Secret]:
        """Every secret with its value; raises SecretError naming one that cannot be decrypted."""
        return [
            Secret(
                s.name,
                decrypt(s.ciphertext, f"secret {s.name} of environment {self.name!r}"),
                s.sandbox_visible,
            )
            for s in self.secrets.all()
        ]

    @transaction.atomic
    def change_secrets(self, changes: dict[str, dict[str, Any] | None], new_revision: bool = True) -> None:
        """Set, re-flag or delete secrets (``None`` deletes); any change is a new revision unless
        the caller saves the environment itself.

        ``changes`` maps NAME to ``{"value": str, "sandbox_visible": bool}`` (either key may be
        missing for an existing secret) or to ``None``. Callers validate names and values.
        """
        changed = False
        existing = {s.name: s for s in self.secrets.all()}
        for name, change in changes.items():
            secret = existing.get(name)
            if change is None:
                if secret is not None:
                    secret.delete()
                    changed = True
                continue
            if secret is None:
                secret = EnvironmentSecret(environment=self, name=name)
            if "value" in change:
                secret.ciphertext = encrypt(change["value"])
            if "sandbox_visible" in change:
                secret.sandbox_visible = bool(change["sandbox_visible"])
            secret.save()
            changed = True
        if changed and new_revision:
            self.save(update_fields=["revision", "updated"])


SECRET_NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"


class EnvironmentSecret(models.Model):
    """One encrypted value. The plaintext exists only in the worker that hands it to a sandbox."""

    environment = models.ForeignKey(Environment, models.CASCADE, related_name="secrets")
    name = models.CharField(
        max_length=100, validators=[RegexValidator(f"^{SECRET_NAME_RE}$", "Not a valid variable name.")]
    )
    ciphertext = models.TextField(editable=False)
    sandbox_visible = models.BooleanField(
        default=False,
        help_text="Give it to the sandbox as an environment variable. Otherwise only the control "
        "plane can use it. Either way its value is scrubbed from output, events and artifacts.",
    )
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["environment", "name"], name="unique_secret_name_per_environment"
            ),
        ]

    def __str__(self) -> str:
        return self.name  # never the value


class SessionStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    IDLE = "idle"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ARCHIVED = "archived"


class Source(models.TextChoices):
    WEB = "web"
    API = "api"
    SLACK = "slack"
    GITHUB = "github"
    WEBHOOK = "webhook"
    SCHEDULE = "schedule"
    CLI = "cli"
    AGENT = "agent"  # spawned by another session's agent (sessions/children.py)


class Session(models.Model):
    # No index of its own: session_team_status (Meta) starts with it. Every status change rewrites
    # the session's row outside HOT (status is indexed), so each index costs every claim and finish.
    team = models.ForeignKey(Team, models.CASCADE, related_name="sessions", db_index=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, models.SET_NULL, null=True, blank=True, related_name="agent_sessions"
    )
    title = models.CharField(max_length=200, blank=True)
    repository = models.ForeignKey(Repository, models.PROTECT, related_name="sessions")
    base_branch = models.CharField(max_length=200)
    branch = models.CharField(max_length=200, blank=True)
    environment = models.ForeignKey(
        Environment, models.SET_NULL, null=True, blank=True, related_name="sessions"
    )
    environment_revision = models.PositiveIntegerField(null=True, blank=True)
    model = models.CharField(max_length=200)
    profile = models.ForeignKey(
        "AgentProfile", models.SET_NULL, null=True, blank=True, related_name="sessions"
    )
    status = models.CharField(max_length=20, choices=SessionStatus.choices, default=SessionStatus.QUEUED)
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.API)
    external_ref = models.JSONField(default=dict, blank=True, help_text="Thread or issue bound to it.")
    pull_request_url = models.URLField(blank=True)
    summary = models.TextField(blank=True)
    error = models.TextField(blank=True)
    # The conversation as the model saw it, so a follow-up run continues it.
    transcript = models.JSONField(default=list, blank=True)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    budget_usd = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="Model spend this session may reach over all its runs. Empty: DEPUTIES_SESSION_BUDGET_USD.",
    )
    last_seq = models.BigIntegerField(default=0, editable=False)
    # Child sessions (sessions/children.py): spawned by this session's agent, in its team.
    parent = models.ForeignKey(
        "self", models.SET_NULL, null=True, blank=True, related_name="children", editable=False
    )
    depth = models.PositiveSmallIntegerField(
        default=0, editable=False, help_text="0 for a top-level session."
    )
    # The parent's run and tool call that spawned it: a resumed run asking again gets this session back.
    spawned_by = models.ForeignKey(
        "Run", models.SET_NULL, null=True, blank=True, related_name="spawned", editable=False
    )
    spawn_call_id = models.CharField(max_length=200, blank=True, editable=False)
    children_cost_usd = models.DecimalField(
        max_digits=12,
        decimal_places=6,
        default=Decimal("0"),
        editable=False,
        help_text="What its child sessions (and theirs) have spent; counts against this session's budget.",
    )
    created = models.DateTimeField(default=timezone.now, db_index=True)
    updated = models.DateTimeField(auto_now=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["team", "status", "-created"], name="session_team_status")]
        constraints = [
            models.UniqueConstraint(
                fields=["spawned_by", "spawn_call_id"],
                condition=models.Q(spawned_by__isnull=False) & ~models.Q(spawn_call_id=""),
                name="unique_child_spawn",
            ),
        ]

    def __str__(self) -> str:
        return self.title or f"Session {self.pk}"

    @property
    def thread_label(self) -> str:
        """The external thread it is bound to, as people read it (``external_ref["thread"]``, set
        by sessions/bindings.py), or ""."""
        ref = self.external_ref if isinstance(self.external_ref, dict) else {}
        return str(ref.get("thread") or "")

    @property
    def active_run(self) -> Run | None:
        return self.runs.filter(status__in=Run.ACTIVE).first()

    def enqueue_run(self, first: bool = False, run: Run | None = None) -> Run:
        """Create the next Run and queue it after commit. Caller holds a transaction.

        ``first``: the session was just created queued, so skip the count and the status reset.
        ``run``: the first run, already inserted (start_session on Postgres).
        """
        if run is None:
            # After the highest attempt so far: a recovered run took the next number (Run.recover_stale).
            last = self.runs.aggregate(last=models.Max("attempt"))["last"] or 0
            run = Run.objects.create(session=self, attempt=1 if first else last + 1)
        if not first:
            Session.objects.filter(pk=self.pk).update(status=SessionStatus.QUEUED, finished=None, error="")
        self.status = SessionStatus.QUEUED
        from deputies.broker import queue_joins_transaction
        from sessions import tasks

        if queue_joins_transaction():
            # The queue row is in this database: insert it with the run, so both commit (and the
            # worker's NOTIFY is delivered) at once, or neither does. No round trip after commit.
            tasks.enqueue_run(run.pk)
        else:
            transaction.on_commit(lambda: tasks.enqueue_run(run.pk))
        return run

    def add_message(self, content: str, author=None, steer: bool = False) -> Message:
        """A follow-up: queued for the active run, or starting a new run when none is active.

        ``steer``: deliver it to the active run before its next model call (sessions/steering.py)
        rather than to the next run; the run's ``steers`` counter is how the loop learns of it.
        """
        from sessions.events import emit

        with transaction.atomic():
            locked = Session.objects.select_for_update(no_key=True).get(pk=self.pk)
            position = locked.messages.count() + 1
            message = Message.objects.create(
                session=locked, content=content, author=author, position=position, steer=steer
            )
            payload = {"message_id": message.pk, "content": content, "position": position}
            if steer:
                payload["steer"] = True
            emit(locked.pk, "message", payload)
            active = locked.runs.filter(status__in=Run.ACTIVE)
            if steer:
                if not active.update(steers=F("steers") + 1):
                    locked.enqueue_run()
            elif not active.exists():
                locked.enqueue_run()
            self.refresh_from_db()
        return message

    def cancel(self) -> bool:
        """Stop the active run (the worker notices at its next step) and close the session."""
        from sessions.events import emit

        with transaction.atomic():
            locked = Session.objects.select_for_update(no_key=True).get(pk=self.pk)
            if locked.status in (SessionStatus.CANCELLED, SessionStatus.ARCHIVED):
                return False
            now = timezone.now()
            active = list(locked.runs.filter(status__in=Run.ACTIVE).values_list("pk", "status"))
            ended = [pk for pk, _ in active]
            if any(status == Run.Status.RUNNING for _, status in active):
                from sessions.limits import wake_after_commit

                wake_after_commit(locked.team_id)  # a limited team's slot frees for its waiting runs
            locked.runs.filter(pk__in=ended, status__in=Run.ACTIVE).update(
                status=Run.Status.CANCELLED, finished=now, error="cancelled by user"
            )
            locked.messages.filter(status=Message.Status.PENDING).update(status=Message.Status.CANCELLED)
            Session.objects.filter(pk=self.pk).update(status=SessionStatus.CANCELLED, finished=now)
            emit(locked.pk, "status", {"status": SessionStatus.CANCELLED})
            from sessions.signals import run_finished

            for run_id in ended:
                run_finished.send(
                    sender=Run, run_id=run_id, session_id=locked.pk, status=Run.Status.CANCELLED,
                    error="cancelled by user", source=locked.source,
                )  # fmt: skip
        self.refresh_from_db()
        from sessions.children import cancel_children

        cancel_children(self.pk)
        return True

    def archive(self) -> bool:
        """Cancel whatever is running, then mark the session archived; False when it already was."""
        from sessions.events import emit

        with transaction.atomic():
            # The row lock orders this against add_message, so no follow-up starts a run in between.
            locked = Session.objects.select_for_update(no_key=True).get(pk=self.pk)
            if locked.status == SessionStatus.ARCHIVED:
                return False
            if locked.runs.filter(status__in=Run.ACTIVE).exists():
                locked.cancel()
            Session.objects.filter(pk=self.pk).update(status=SessionStatus.ARCHIVED)
            emit(self.pk, "status", {"status": SessionStatus.ARCHIVED})
        self.refresh_from_db()
        return True

    def retry(self) -> Run | None:
        """Start a fresh run over the last prompt of a failed or cancelled session."""
        with transaction.atomic():
            locked = Session.objects.select_for_update(no_key=True).get(pk=self.pk)
            if locked.runs.filter(status__in=Run.ACTIVE).exists():
                return None
            last = locked.messages.order_by("-position").first()
            if last is not None and last.status != Message.Status.PENDING:
                Message.objects.filter(pk=last.pk).update(status=Message.Status.PENDING, run=None)
            run = locked.enqueue_run()
        self.refresh_from_db()
        return run

    def add_usage(self, input_tokens: int, output_tokens: int, cached_tokens: int, cost: Decimal) -> None:
        Session.objects.filter(pk=self.pk).update(
            input_tokens=F("input_tokens") + input_tokens,
            output_tokens=F("output_tokens") + output_tokens,
            cached_tokens=F("cached_tokens") + cached_tokens,
            cost_usd=F("cost_usd") + cost,
        )


class Message(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        CLAIMED = "claimed"
        DONE = "done"
        CANCELLED = "cancelled"

    session = models.ForeignKey(Session, models.CASCADE, related_name="messages")
    position = models.PositiveIntegerField()
    author = models.ForeignKey(settings.AUTH_USER_MODEL, models.SET_NULL, null=True, blank=True)
    content = models.TextField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    run = models.ForeignKey("Run", models.SET_NULL, null=True, blank=True, related_name="messages")
    steer = models.BooleanField(
        default=False,
        help_text="Delivered to the running agent before its next model call, not to the next run.",
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["session", "position"]
        constraints = [
            models.UniqueConstraint(fields=["session", "position"], name="unique_message_position"),
        ]

    def __str__(self) -> str:
        return f"#{self.position} of session {self.session_id}"

    def edit(self, content: str) -> bool:
        """Change a follow-up no run has picked yet; False once one has (sessions/steering.py)."""
        from sessions.steering import edit_pending

        return edit_pending(self, content)

    def withdraw(self) -> bool:
        """Cancel a follow-up no run has picked yet; False once one has (sessions/steering.py)."""
        from sessions.steering import cancel_pending

        return cancel_pending(self)


@dataclass(frozen=True)
class Checkpoint:
    """What a recovered attempt goes on from (``Run.checkpoint``): the step count, the todo list and
    the first ``upto`` messages of ``transcript``.

    Between compactions the conversation only grows at its end, so on Postgres a write sends only
    the messages after the first ``kept``, which the run's saved conversation already holds, and
    appends them there: a step costs its own messages, not the whole conversation twice over
    (``kept=0`` writes it whole). Should the saved one not hold exactly ``kept`` messages, it is
    left as it is rather than spliced wrong."""

    steps: int
    todos: list | None
    transcript: list[dict[str, Any]]
    upto: int
    kept: int = 0

    def value(self) -> dict[str, Any]:
        return {"steps": self.steps, "transcript": self.transcript[: self.upto], "todos": self.todos}

    def sql(self, params: dict[str, Any]) -> str:
        """The new value of the run row's ``checkpoint`` column (Postgres), its parameters added
        to ``params``."""
        params["cp_steps"] = self.steps
        params["cp_todos"] = json.dumps(self.todos)
        params["cp_messages"] = json.dumps(self.transcript[self.kept : self.upto])
        params["cp_kept"] = self.kept
        whole = (
            "jsonb_build_object('steps', %(cp_steps)s::int, 'transcript', {}, 'todos', %(cp_todos)s::jsonb)"
        )
        saved = "checkpoint->'transcript'"
        return (
            f"CASE WHEN %(cp_kept)s::int = 0 THEN {whole.format('%(cp_messages)s::jsonb')} "
            f"WHEN jsonb_array_length({saved}) = %(cp_kept)s::int "
            f"THEN {whole.format(f'({saved}) || %(cp_messages)s::jsonb')} ELSE checkpoint END"
        )


def _finish_tables() -> dict[str, str]:
    """The tables of a run's end statements (``Run._FINISH``, ``Run._FINISH_WITH_EVENTS``)."""
    from sandboxes.models import Sandbox

    return {
        "run": Run._meta.db_table,
        "message": Message._meta.db_table,
        "session": Session._meta.db_table,
        "team": Team._meta.db_table,
        "sandbox": Sandbox._meta.db_table,
    }


def _session_assignments(fields: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """``column = %(fN)s`` for each of the session's ``fields``, their values put in ``params``
    through the model's own fields, so JSON and the like are adapted as the ORM would adapt them."""
    from django.db import connection

    assignments = []
    for n, (name, value) in enumerate(fields.items()):
        field = Session._meta.get_field(name)
        assignments.append(f"{connection.ops.quote_name(field.column)} = %(f{n})s")
        params[f"f{n}"] = field.get_db_prep_save(value, connection)
    return assignments


class Run(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    session = models.ForeignKey(Session, models.CASCADE, related_name="runs")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    attempt = models.PositiveIntegerField(default=1)
    lease_owner = models.CharField(max_length=200, blank=True)
    heartbeat = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    steps = models.PositiveIntegerField(default=0)
    # Steer messages sent to this run (Session.add_message); the heartbeat reads it back, so the loop
    # notices one without a query of its own (sessions/steering.py).
    steers = models.PositiveIntegerField(default=0)
    # Waiting for child sessions (wait_sessions): not counted against its team's concurrency limit,
    # so the children it waits for can start (sessions/children.py).
    waiting = models.BooleanField(default=False)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    # Where a recovered attempt goes on from (sessions/runner.py, Runner.resume): the conversation
    # as of the last saved step, with the todo list. Written by the statements a step makes anyway
    # (the heartbeat, the model call's usage), so saving it costs no extra round trip.
    checkpoint = models.JSONField(default=dict, blank=True, editable=False)

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(
                fields=["session"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_run_per_session",
            ),
        ]
        indexes = [  # the workers' lease check (recover_stale) reads only running runs
            models.Index(fields=["heartbeat"], condition=Q(status="running"), name="run_running_heartbeat"),
        ]

    # Set by claim(): this attempt goes on from where a lost worker left the run.
    recovered = False
    # Set by claim_loaded(), which learns them in the claim's own statement (None: not known, ask).
    claimed_prompts: list[str] | None = None  # the messages this claim took, in order (a first claim)
    only_run = False  # the session has no other run: nothing else writes its transcript
    team_skills: bool | None = None  # the team has skills this session's creator may load
    team_mcp_servers: bool | None = None  # the team has enabled MCP servers

    def __str__(self) -> str:
        return f"Run {self.pk} ({self.status})"

    def claim(self, owner: str) -> bool:
        """Conditional update: exactly one worker wins; a duplicate delivery changes zero rows.

        The claim, the session's status, the claimed messages and the ``run_started`` event commit
        together, in as few round trips as possible: this is on the dispatch path.

        A team with a concurrency limit (``Team.concurrency_limit``) is claimed for under its row
        lock, so two workers cannot both take its last slot; a run that finds no slot stays queued
        (``self.waiting_for_team``) and is queued again when one frees (sessions/limits.py).

        A run that had started before lost its worker (``recover_stale``): it keeps its first start
        (its time limits count from there) and is ``recovered``, so the runner resumes it.
        """
        now = timezone.now()
        self.waiting_for_team = False
        self.recovered = self.started is not None
        with transaction.atomic():
            claimed = self._claim_rows(owner, now)
            if claimed is Run.LIMITED:
                from sessions.limits import claim_within_limit

                claimed = claim_within_limit(self, owner, now)
                self.waiting_for_team = claimed is Run.LIMITED
            if claimed is not True:
                return False
            session = self._state.fields_cache.get("session")
            self._started(session.source if session is not None else None)
        self.status, self.lease_owner, self.heartbeat = Run.Status.RUNNING, owner, now
        self.started = self.started or now
        return True

    @staticmethod
    def _started_events(run_id: int, attempt: int) -> list[tuple[str, dict]]:
        return [
            ("run_started", {"run_id": run_id, "attempt": attempt}),
            ("status", {"status": "running"}),
        ]

    def _started(self, source: str | None, emitted: bool = False) -> None:
        """In the claim's transaction: its events (unless the claim's statement ``emitted`` them),
        and the ``run_started`` signal."""
        from sessions.events import emit_many
        from sessions.signals import run_started

        if not emitted:
            emit_many(self.session_id, self._started_events(self.pk, self.attempt), run_id=self.pk)
        run_started.send(
            sender=Run, run_id=self.pk, session_id=self.session_id, attempt=self.attempt, source=source
        )

    # The run, the session's status and the pending messages in one statement (a round trip each
    # otherwise, on the dispatch path). The messages are claimed only if the run was (``FROM r``),
    # and only by its first claim: a resumed attempt goes on with the conversation it had, and
    # follow-ups sent meanwhile wait for the next run (Run.finish starts it).
    # ``lim`` is the team's concurrency limit: this statement claims only for a team without one
    # (``{guard}``); for a limited team it says so and sessions/limits.py claims under the team's lock.
    _CLAIM_WITH = """
    WITH lim AS (
        SELECT x.status, s.team_id, COALESCE(t.max_concurrent_runs, %(default_limit)s) AS n
        FROM {run} x JOIN {session} s ON s.id = x.session_id JOIN {team} t ON t.id = s.team_id
        WHERE x.id = %(id)s
    ),
    r AS (
        UPDATE {run} SET status = %(running)s, lease_owner = %(owner)s, started = COALESCE(started, %(now)s),
            heartbeat = %(now)s
        WHERE id = %(id)s AND status = %(queued)s AND {guard}
        RETURNING *, started = %(now)s AS first
    ),
    s AS (
        UPDATE {session} t SET status = %(session_running)s FROM r
        WHERE t.id = r.session_id AND t.status <> ALL(%(closed)s)
        RETURNING t.id
    ),
    m AS (
        UPDATE {message} t SET status = %(claimed)s, run_id = r.id FROM r
        WHERE t.session_id = r.session_id AND t.status = %(pending)s AND r.first
        RETURNING t.content, t.position
    )
    """
    _CLAIM = _CLAIM_WITH + "SELECT (SELECT count(*) FROM r), (SELECT status FROM lim), (SELECT n FROM lim)"
    # Team without a limit. With one (under the team's row lock): the runs running plus the team's
    # runs queued before this one leave a slot, so waiting runs start oldest first.
    UNLIMITED_GUARD = "(SELECT n FROM lim) = 0"
    LIMIT_GUARD = (
        "((SELECT n FROM lim) = 0 OR (SELECT count(*) FROM {run} q JOIN {session} qs ON qs.id = q.session_id "
        "WHERE qs.team_id = (SELECT team_id FROM lim) AND ((q.status = %(running)s AND NOT q.waiting) "
        "OR (q.status = %(queued)s AND q.id < %(id)s))) < (SELECT n FROM lim))"
    )
    LIMITED = "limited"  # _claim_rows: queued, but its team has no free slot (or must be locked first)

    def _claim_rows(self, owner: str, now, guard: str = UNLIMITED_GUARD) -> bool | str:
        """True: claimed. False: not queued any more. ``LIMITED``: its team has a limit (with the
        unlimited guard) or no free slot (with ``LIMIT_GUARD``)."""
        from django.db import connection

        if connection.vendor != "postgresql":
            from sessions.limits import slot_free

            if not Run.objects.filter(pk=self.pk, status=Run.Status.QUEUED).exists():
                return False
            team = Team.objects.get(sessions__runs=self.pk)
            if team.concurrency_limit() and (guard == Run.UNLIMITED_GUARD or not slot_free(self, team)):
                return Run.LIMITED
            changed = Run.objects.filter(pk=self.pk, status=Run.Status.QUEUED).update(
                status=Run.Status.RUNNING,
                lease_owner=owner,
                started=Coalesce(F("started"), Value(now)),
                heartbeat=now,
            )
            if not changed:
                return False
            Session.objects.filter(pk=self.session_id).exclude(
                status__in=(SessionStatus.CANCELLED, SessionStatus.ARCHIVED)
            ).update(status=SessionStatus.RUNNING)
            if self.recovered:
                return True
            Message.objects.filter(session_id=self.session_id, status=Message.Status.PENDING).update(
                status=Message.Status.CLAIMED, run=self
            )
            return True
        tables = {"run": Run._meta.db_table, "session": Session._meta.db_table, "team": Team._meta.db_table}
        sql = self._CLAIM.format(message=Message._meta.db_table, guard=guard.format(**tables), **tables)
        with connection.cursor() as cursor:
            cursor.execute(sql, Run._claim_params(self.pk, owner, now))
            claimed, status, limit = cursor.fetchone()
        if claimed:
            return True
        return Run.LIMITED if status == Run.Status.QUEUED and limit else False

    @staticmethod
    def _claim_params(run_id: int, owner: str, now) -> dict[str, Any]:
        return {
            "default_limit": settings.TEAM_MAX_CONCURRENT_RUNS,
            "id": run_id,
            "owner": owner,
            "now": now,
            "running": Run.Status.RUNNING,
            "queued": Run.Status.QUEUED,
            "session_running": SessionStatus.RUNNING,
            "closed": [SessionStatus.CANCELLED, SessionStatus.ARCHIVED],
            "claimed": Message.Status.CLAIMED,
            "pending": Message.Status.PENDING,
        }

    # The claim of a team without a limit (_CLAIM's guard) that also reads what the runner needs:
    # the run with its session, repository, environment, team and profile (select_related's rows),
    # the claimed messages and a few facts that spare the runner a query each. One round trip.
    # ``q`` acknowledges the run's queue task in the claim's transaction (``ack``: its id, or NULL),
    # unless the run is left queued for ``claim`` to take under its team's lock: from the claim on,
    # the run's lease protects it, and until then the queue does (deputies/worker.py).
    # Its ``run_started`` and ``status`` events are written by it too (sessions/events.py
    # ``_PG_CTES``), only if it claimed: the run_started payload is built here from the claimed row
    # (its attempt), in the text Python's compact JSON would give; the session's status goes in the
    # events' own UPDATE of the session's row (Postgres updates a row once per statement), so
    # ``_CLAIM_WITH``'s ``s`` is left out.
    _CLAIM_SESSION_CTE = """
    s AS (
        UPDATE {session} t SET status = %(session_running)s FROM r
        WHERE t.id = r.session_id AND t.status <> ALL(%(closed)s)
        RETURNING t.id
    ),"""
    _CLAIM_LOADED = (
        _CLAIM_WITH.replace("{guard}", UNLIMITED_GUARD).replace(_CLAIM_SESSION_CTE, "")
        + """,
    q AS (
        DELETE FROM {queue} WHERE id = %(ack)s AND (EXISTS (SELECT 1 FROM r)
            OR COALESCE((SELECT status FROM lim) <> %(queued)s OR (SELECT n FROM lim) = 0, true))
    ),
    {events}
    SELECT (SELECT status FROM lim), (SELECT n FROM lim), r.first, (SELECT status FROM s) = %(session_running)s,
        (SELECT json_agg(m.content ORDER BY m.position) FROM m),
        (SELECT json_agg(json_build_array(id, seq)) FROM ins), (SELECT count(*) FROM nt),
        NOT EXISTS (SELECT 1 FROM {run} o WHERE o.session_id = r.session_id AND o.id <> r.id),
        EXISTS (SELECT 1 FROM {skill} k WHERE k.team_id = se.team_id
            AND (k.owner_id IS NULL OR k.owner_id = se.created_by_id)),
        EXISTS (SELECT 1 FROM {mcp} v WHERE v.team_id = se.team_id AND v.enabled),
        {columns}
    FROM (SELECT 1) one LEFT JOIN r ON true
        LEFT JOIN {session} se ON se.id = r.session_id
        LEFT JOIN {repository} re ON re.id = se.repository_id
        LEFT JOIN {environment} en ON en.id = se.environment_id
        LEFT JOIN {team} te ON te.id = se.team_id
        LEFT JOIN {profile} pr ON pr.id = se.profile_id
    """
    )
    _claim_loaded_sql: tuple[str, list] | None = None

    @classmethod
    def claim_loaded(cls, run_id: int, owner: str, ack: int | None = None) -> tuple[Run | None, str | None]:
        """Postgres: claim a run of a team without a concurrency limit and load it as the runner
        does (``select_related`` of its session's repository, environment, team and profile), in one
        statement. (run, "running"); or (None, its status: None when it does not exist,
        ``LIMITED`` when its team has a limit and ``claim`` must take the team's lock). ``ack`` is
        the queue task (on this database) acknowledged in the same statement, except when LIMITED."""

        if cls._claim_loaded_sql is None:
            cls._claim_loaded_sql = cls._build_claim_loaded()
        from sessions.events import statement_events

        sql, parts = cls._claim_loaded_sql
        # The events' attempt is the claimed row's (the statement writes it); the rest is known.
        # Their time is taken after the claim's, as when they were emitted after it.
        claim_params = Run._claim_params(run_id, owner, timezone.now())
        params, stored = statement_events(run_id, Run._started_events(run_id, 0))
        with transaction.atomic():
            with prepared_cursor() as cursor:
                cursor.execute(sql, {**claim_params, "ack": ack, **params})
                row = cursor.fetchone()
            status, limit, first, session_claimed, prompts, inserted, _, only_run, skills, mcp = row[:10]
            if first is None:  # not claimed
                if status == Run.Status.QUEUED and limit:
                    return None, Run.LIMITED
                return None, status
            objects, at = [], 10
            for columns in parts:  # as select_related makes them; a missing row (no profile) is None
                values = row[at : at + len(columns.names)]
                at += len(columns.names)
                objects.append(None if values[0] is None else columns.build(values))
            run, session, repository, environment, team, profile = objects
            run.recovered = not first
            if session_claimed:
                session.status = SessionStatus.RUNNING
            session._state.fields_cache.update(
                repository=repository, environment=environment, team=team, profile=profile
            )
            run._state.fields_cache["session"] = session
            if first:
                if isinstance(prompts, str):
                    prompts = json.loads(prompts)
                run.claimed_prompts = list(prompts or [])
            run.only_run, run.team_skills, run.team_mcp_servers = only_run, skills, mcp
            stored(run.session_id, Run._started_events(run.pk, run.attempt), inserted)
            run._started(session.source, emitted=True)
        run.waiting_for_team = False
        return run, Run.Status.RUNNING

    @staticmethod
    def _build_claim_loaded() -> tuple[str, list[Columns]]:
        # r is the claimed run's row as it was updated (RETURNING *).
        joined = [("r", Run), ("se", Session), ("re", Repository), ("en", Environment), ("te", Team),
                  ("pr", AgentProfile)]  # fmt: skip
        parts = [Columns(model, alias) for alias, model in joined]
        assert all(c.fields[0].primary_key for c in parts)  # the first value says whether there is a row
        tables = {
            "run": Run, "session": Session, "team": Team, "message": Message, "repository": Repository,
            "environment": Environment, "profile": AgentProfile, "skill": Skill, "mcp": McpServer,
        }  # fmt: skip
        from django_q.models import OrmQ

        from sessions.events import _PG_CTES

        events = _PG_CTES.format(
            gate="EXISTS (SELECT 1 FROM r)",
            session="(SELECT session_id FROM r)",
            payload="""CASE WHEN t = 'run_started' THEN format('{"run_id":%%s,"attempt":%%s}',
                (SELECT id FROM r), (SELECT attempt FROM r))::json ELSE p END""",
            session_set=", status = CASE WHEN t.status <> ALL(%(closed)s) THEN %(session_running)s ELSE t.status END",
        )
        sql = Run._CLAIM_LOADED.format(
            columns=", ".join(c.sql for c in parts),
            queue=OrmQ._meta.db_table,
            events=events,
            **{k: m._meta.db_table for k, m in tables.items()},
        )
        return sql, parts

    @classmethod
    def recover_stale(cls, cutoff) -> list[int]:
        """Queue runs again whose worker stopped heartbeating (crash, OOM, lost host).

        The conditional update makes this safe to run anywhere, any number of times; a run that
        lost its worker DEPUTIES_RUN_MAX_RECOVERIES times fails instead of looping forever.
        """
        from sessions import tasks
        from sessions.events import emit

        requeued = []
        stale = cls.objects.filter(status=cls.Status.RUNNING, heartbeat__lt=cutoff).defer("checkpoint")
        for run in stale:
            recoveries = Event.objects.filter(run=run, type="run_requeued").count()
            if recoveries >= settings.RUN_MAX_RECOVERIES:
                run.finish(cls.Status.FAILED, f"the worker running it was lost {recoveries + 1} times")
                emit(run.session_id, "run_failed", {"run_id": run.pk, "error": run.error}, run_id=run.pk)
                continue
            with transaction.atomic():
                # The next attempt resumes from the run's checkpoint (Runner.resume).
                changed = cls.objects.filter(
                    pk=run.pk, status=cls.Status.RUNNING, heartbeat__lt=cutoff
                ).update(status=cls.Status.QUEUED, lease_owner="", attempt=F("attempt") + 1, waiting=False)
                if changed:
                    emit(
                        run.session_id,
                        "run_requeued",
                        {"run_id": run.pk, "lost_worker": run.lease_owner, "attempt": run.attempt + 1},
                        run_id=run.pk,
                    )
                    transaction.on_commit(lambda pk=run.pk: tasks.enqueue_run(pk))
                    requeued.append(run.pk)
        return requeued

    def is_cancelled(self) -> bool:
        return Run.objects.filter(pk=self.pk, status=Run.Status.CANCELLED).exists()

    def beat(
        self, checkpoint: Checkpoint | None = None, events: list[tuple[str, dict]] | None = None
    ) -> bool:
        """Heartbeat; returns False when the run was cancelled under us or ran out of time.

        ``checkpoint`` (the agent's state after its last step) is saved in the same statement, and
        ``events`` (what the last step held back) are written by it too on Postgres
        (sessions/events.py ``emit_many_with``), elsewhere in its transaction; either way, before it.

        Runs share their worker process (sessions/workpool.py), so DEPUTIES_RUN_TIMEOUT is enforced
        here, at the next step, rather than by killing the process.
        """
        from django.db import connection

        now = timezone.now()
        if self.started and (now - self.started).total_seconds() > settings.RUN_TIMEOUT:
            error = f"the run took longer than {settings.RUN_TIMEOUT} s (DEPUTIES_RUN_TIMEOUT)"
            ending = [("run_failed", {"run_id": self.pk, "error": error}), ("status", {"status": "failed"})]
            self.finish(Run.Status.FAILED, error, events=[*(events or []), *ending])
            return False
        if events and connection.vendor != "postgresql":
            from sessions.events import emit_many

            with transaction.atomic():
                emit_many(self.session_id, events, run_id=self.pk)
                return self._beat_rows(now, checkpoint)
        return self._beat_rows(now, checkpoint, events)

    def _beat_rows(self, now, checkpoint, events=None) -> bool:
        """The heartbeat statement, only while the lease is ours: a worker cut off (or starved) for
        longer than the lease, whose run was recovered and claimed again (the next attempt, maybe by
        this same process), stops at its next step instead of running it twice.

        It also reads back ``steers`` into ``self.steers``, so a steer message costs the loop no
        extra query per step (sessions/steering.py)."""
        from django.db import connection

        fields: dict[str, Any] = {"heartbeat": now, "steps": self.steps}
        postgres = connection.vendor == "postgresql"
        if checkpoint is not None and not postgres:
            fields["checkpoint"] = checkpoint.value()
        assignments, params = [], {}
        for name, value in fields.items():
            field = Run._meta.get_field(name)
            assignments.append(f"{connection.ops.quote_name(field.column)} = %({name})s")
            params[name] = field.get_db_prep_save(value, connection)
        if checkpoint is not None and postgres:
            assignments.append(f"checkpoint = {checkpoint.sql(params)}")
        table = connection.ops.quote_name(Run._meta.db_table)
        sql = (
            f"UPDATE {table} SET {', '.join(assignments)} WHERE id = %(id)s AND status = %(status)s "
            f"AND lease_owner = %(owner)s AND attempt = %(attempt)s{' AND {locked}' if events else ''} "
            "RETURNING steers"
        )
        params |= {
            "id": self.pk,
            "status": Run.Status.RUNNING,
            "owner": self.lease_owner,
            "attempt": self.attempt,
        }
        if events:  # one statement with them, after them (sessions/events.py)
            from sessions.events import emit_many_with

            _, returned = emit_many_with(self.session_id, events, self.pk, sql, params)
            row = (returned["steers"],) if returned is not None else None
        else:
            with prepared_cursor() as cursor:
                cursor.execute(sql, params)
                row = cursor.fetchone()
        if row is None:
            return False
        self.steers = row[0]
        return True

    def finish(
        self,
        status: str,
        error: str = "",
        *,
        session_fields: dict | None = None,
        events: list[tuple[str, dict]] | None = None,
        sandbox_id: int | None = None,
    ) -> bool:
        """Close the run unless someone (cancel) already did; then start a run for queued follow-ups.

        ``session_fields`` are written to the session with its new status, and ``events`` emitted,
        in the same transaction, only when this call closed the run. The sandbox ``sandbox_id``
        (the runner's) is marked used now in any case: its idle time starts here.
        """
        now = timezone.now()
        error = error[:10000]
        session_status = SessionStatus.COMPLETED if status == Run.Status.COMPLETED else SessionStatus.FAILED
        fields = {
            "status": session_status,
            "finished": now,
            "error": "" if status == Run.Status.COMPLETED else error,
            **(session_fields or {}),
        }
        message_status = Message.Status.DONE if status == Run.Status.COMPLETED else Message.Status.CANCELLED
        with transaction.atomic():
            pending = checks = None
            if events and transaction.get_connection().vendor == "postgresql":
                closed = self._finish_with_events(
                    status, error, now, message_status, fields, sandbox_id, events
                )
                if closed:
                    *closed, pending, checks = closed
                    events = None
            else:
                closed = self._finish_rows(status, error, now, message_status, fields, sandbox_id)
            if not closed:
                self.refresh_from_db()
                return False
            team_id, limit, source = closed
            if limit:  # a slot of a limited team is free once this commits (sessions/limits.py)
                from sessions.limits import wake_after_commit

                wake_after_commit(team_id, limit)
            # Asked after the session's row lock is held, so that a follow-up add_message
            # committed while we waited for the lock is seen (its own check saw this run still
            # active, so it left the new run to us); _FINISH_WITH_EVENTS answers it when it can.
            from sessions.signals import run_finished

            if pending is None:
                pending = exists(
                    Message, "session_id = %s AND status = %s", [self.session_id, Message.Status.PENDING]
                )
            if pending:
                Session.objects.get(pk=self.session_id).enqueue_run()
            if events:
                from sessions.events import emit_many

                emit_many(self.session_id, events, run_id=self.pk)
            run_finished.send(
                sender=Run, run_id=self.pk, session_id=self.session_id, status=status, error=error,
                source=source, **({"checks": checks} if checks else {}),
            )  # fmt: skip
        self.status, self.finished, self.error = status, now, error
        return True

    # The run (its checkpoint is of no use once it ended: the session has the transcript), its
    # claimed messages and the session in one statement, the run first; updating the
    # session takes its row lock (ordering this against add_message and cancel), as SELECT ... FOR
    # UPDATE did. The messages and the session change only if the run did (``FROM r``).
    _FINISH_HEAD = """
    WITH r AS (
        UPDATE {run} SET status = %(status)s, finished = %(now)s, error = %(error)s, steps = %(steps)s,
            checkpoint = '{{}}'
        WHERE id = %(id)s AND status = %(running)s AND attempt = %(attempt)s
        RETURNING id, session_id
    ),
    m AS (
        UPDATE {message} t SET status = %(message_status)s FROM r
        WHERE t.run_id = r.id AND t.status = %(claimed)s
    ),
    sb AS (UPDATE {sandbox} SET last_used = %(now)s WHERE id = %(sandbox_id)s),"""
    _FINISH = (
        _FINISH_HEAD
        + """
    s AS (
        UPDATE {session} t SET {assignments} FROM r WHERE t.id = r.session_id RETURNING t.id
    )
    SELECT (SELECT count(*) FROM r), x.team_id, COALESCE(t.max_concurrent_runs, %(default_limit)s), x.source
    FROM {session} x JOIN {team} t ON t.id = x.team_id WHERE x.id = %(session_id)s
    """
    )

    # Run.finish with events: _FINISH's rows and the events (sessions/events.py ``_PG_CTES``; the
    # session's columns go in the events' own UPDATE of its row), in one statement, which also
    # tells whether a follow-up waits. That check reads the statement's snapshot, taken before the
    # session's row lock was granted: a follow-up committed while this waited for the lock would
    # be missed. add_message writes the session's row (its message event's seq) under that lock,
    # so the row the UPDATE found (``s``, the latest version) and the snapshot's (``x``) differ by
    # more than this statement's own events exactly when someone changed the session meanwhile;
    # then (``settled`` false) the caller asks again, in a statement of its own.
    _FINISH_WITH_EVENTS = (
        _FINISH_HEAD
        + """
    {events}
    SELECT (SELECT count(*) FROM r), x.team_id, COALESCE(t.max_concurrent_runs, %(default_limit)s), x.source,
        (SELECT json_agg(json_build_array(id, seq)) FROM ins), (SELECT count(*) FROM nt),
        (SELECT s.last_seq - s.n FROM s) = x.last_seq,
        EXISTS (SELECT 1 FROM {message} p WHERE p.session_id = %(session_id)s AND p.status = %(pending)s)
        {asked}
    FROM {session} x JOIN {team} t ON t.id = x.team_id WHERE x.id = %(session_id)s
    """
    )

    def _finish_with_events(
        self,
        status: str,
        error: str,
        now: datetime,
        message_status: str,
        fields: dict,
        sandbox_id: int | None,
        events: list[tuple[str, dict]],
    ) -> tuple[int, int, str, bool | None, dict] | None:
        """Postgres, ``_FINISH_WITH_EVENTS``: None when the run was not running; else _finish_rows's
        answer, whether a follow-up waits and the ``finish_checks``' answers (None and none when
        the session changed meanwhile: the caller asks again, the receivers ask themselves)."""
        from sessions.events import _PG_CTES, statement_events
        from sessions.signals import finish_checks

        params, stored = statement_events(self.pk, events)
        assignments = _session_assignments(fields, params)
        ctes = _PG_CTES.format(
            gate="EXISTS (SELECT 1 FROM r)",
            session="%(session_id)s::bigint",
            payload="p",
            session_set="".join(f", {a}" for a in assignments),
        )
        sql = self._FINISH_WITH_EVENTS.format(
            **_finish_tables(),
            events=ctes,
            asked="".join(f", ({sql})" for sql in finish_checks.values()),
        )
        params.update(
            self._finish_params(status, error, now, message_status, sandbox_id),
            pending=Message.Status.PENDING,
            finish_session=self.session_id,
        )
        with prepared_cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if not row or not row[0]:
            return None
        stored(self.session_id, events, row[4])
        if not row[6]:  # not settled: asked again after the lock, the checks by their receivers
            return row[1], row[2], row[3], None, {}
        return row[1], row[2], row[3], row[7], dict(zip(finish_checks, row[8:], strict=True))

    def _finish_params(
        self, status: str, error: str, now: datetime, message_status: str, sandbox_id: int | None
    ) -> dict[str, Any]:
        """The parameters ``_FINISH`` and ``_FINISH_WITH_EVENTS`` share."""
        return {
            "id": self.pk,
            "status": status,
            "now": now,
            "error": error,
            "steps": self.steps,
            "attempt": self.attempt,
            "running": Run.Status.RUNNING,
            "message_status": message_status,
            "claimed": Message.Status.CLAIMED,
            "session_id": self.session_id,
            "default_limit": settings.TEAM_MAX_CONCURRENT_RUNS,
            "sandbox_id": sandbox_id,
        }

    def _finish_rows(
        self, status: str, error: str, now, message_status: str, fields: dict, sandbox_id: int | None
    ) -> tuple[int, int, str] | None:
        """None when the run was not running; else its team's id and concurrency limit, and the
        session's source."""
        from django.db import connection

        from sandboxes.models import Sandbox

        if connection.vendor != "postgresql":
            if sandbox_id is not None:
                Sandbox.objects.filter(pk=sandbox_id).update(last_used=now)
            changed = Run.objects.filter(pk=self.pk, status=Run.Status.RUNNING, attempt=self.attempt)
            if not changed.update(status=status, finished=now, error=error, steps=self.steps, checkpoint={}):
                return None
            Message.objects.filter(run=self, status=Message.Status.CLAIMED).update(status=message_status)
            Session.objects.select_for_update(no_key=True).filter(pk=self.session_id).exists()
            Session.objects.filter(pk=self.session_id).update(**fields)
            session = Session.objects.select_related("team").get(pk=self.session_id)
            return session.team_id, session.team.concurrency_limit(), session.source
        params: dict = {}
        assignments = _session_assignments(fields, params)
        sql = self._FINISH.format(**_finish_tables(), assignments=", ".join(assignments))
        params.update(self._finish_params(status, error, now, message_status, sandbox_id))
        with prepared_cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        return (row[1], row[2], row[3]) if row and row[0] else None

    def add_usage(
        self,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int,
        cost: Decimal,
        checkpoint: Checkpoint | None = None,
        call: dict[str, Any] | None = None,
        events: list[tuple[str, dict]] | None = None,
    ) -> None:
        """Count one model call's usage on the run and its session (one statement on Postgres).

        ``checkpoint`` (the conversation with the model's reply) is saved on the run in the same
        statement, so a worker lost while the reply's tools run does not ask the model again.
        ``call``: the call's LLMCall row (its fields other than the run, session and usage), inserted
        by the same statement. ``events`` are emitted after it, in its transaction: on Postgres by
        the same statement (sessions/events.py ``emit_many_with``), which then takes the session's
        row lock before the run's, as the heartbeat does.
        A child session's ancestors are charged first: sessions are locked top-down
        (sessions/children.py), so in a transaction this must come before anything that locks
        the session's own row.
        """
        from django.db import connection

        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_tokens += cached_tokens
        self.cost_usd += cost
        counts = (input_tokens, output_tokens, cached_tokens, cost)
        parent_id = self._ancestor_id(cost)
        if events and (connection.vendor != "postgresql" or parent_id):
            from sessions.events import emit_many

            with transaction.atomic():
                self._write_usage(*counts, checkpoint, call, parent_id)
                emit_many(self.session_id, events, run_id=self.pk)
        else:
            self._write_usage(*counts, checkpoint, call, parent_id, events)

    def _write_usage(
        self, input_tokens, output_tokens, cached_tokens, cost, checkpoint, call, parent_id, events=None
    ):
        from django.db import connection

        if parent_id:  # a child session's spend counts against its ancestors' budgets (sessions/children.py)
            from sessions.children import charge_ancestors

            charge_ancestors(parent_id, cost)
        counted = {"input_tokens": input_tokens, "output_tokens": output_tokens, "cached_tokens": cached_tokens,
                   "cost_usd": cost}  # fmt: skip
        if connection.vendor != "postgresql":
            Run.objects.filter(pk=self.pk).update(
                input_tokens=F("input_tokens") + input_tokens,
                output_tokens=F("output_tokens") + output_tokens,
                cached_tokens=F("cached_tokens") + cached_tokens,
                cost_usd=F("cost_usd") + cost,
                **({"checkpoint": checkpoint.value()} if checkpoint is not None else {}),
            )
            if call is not None:
                LLMCall.objects.create(session_id=self.session_id, run=self, **counted, **call)
            Session.objects.filter(pk=self.session_id).update(
                input_tokens=F("input_tokens") + input_tokens,
                output_tokens=F("output_tokens") + output_tokens,
                cached_tokens=F("cached_tokens") + cached_tokens,
                cost_usd=F("cost_usd") + cost,
            )
            return
        add = (
            "input_tokens = t.input_tokens + %(i)s, output_tokens = t.output_tokens + %(o)s, "
            "cached_tokens = t.cached_tokens + %(c)s, cost_usd = t.cost_usd + %(cost)s"
        )
        params = {"i": input_tokens, "o": output_tokens, "c": cached_tokens, "cost": cost, "run": self.pk,
                  "session": self.session_id}  # fmt: skip
        saved = ""
        if checkpoint is not None:  # not over the checkpoints of a later attempt (see beat)
            saved = f", checkpoint = CASE WHEN t.attempt = %(attempt)s THEN {checkpoint.sql(params)} ELSE t.checkpoint END"
            params["attempt"] = self.attempt
        inserted = ""
        if call is not None:
            row = {
                "session_id": self.session_id,
                "run_id": self.pk,
                **counted,
                "created": timezone.now(),
                **call,
            }
            columns = ", ".join(LLMCall._meta.get_field(name).column for name in row)
            values = ", ".join(f"%(call_{name})s" for name in row)
            params |= {f"call_{name}": value for name, value in row.items()}
            inserted = f"llm AS (INSERT INTO {LLMCall._meta.db_table} ({columns}) VALUES ({values})), "
        run = f"UPDATE {Run._meta.db_table} t SET {add}{saved} WHERE t.id = %(run)s"
        if events:  # the session's usage goes in the events' own UPDATE of its row
            from sessions.events import emit_many_with

            emit_many_with(
                self.session_id,
                events,
                self.pk,
                f"{run} AND {{locked}} RETURNING t.id",
                params,
                session_set=f", {add}",
                before=inserted,
            )
            return
        sql = f"WITH {inserted}r AS ({run} RETURNING t.id) UPDATE {Session._meta.db_table} t SET {add} WHERE t.id = %(session)s"
        with prepared_cursor() as cursor:
            cursor.execute(sql, params)

    def _ancestor_id(self, cost: Decimal) -> int | None:
        """The parent session to charge ``cost`` to, if any (a child session with a cost)."""
        if not cost:
            return None
        session = self._state.fields_cache.get("session")
        if session is not None:
            return session.parent_id
        return Session.objects.filter(pk=self.session_id).values_list("parent_id", flat=True).first()


class WorkerProcess(models.Model):
    """A ``deputies worker`` process, as it last said it was alive: /setup shows the workers' real
    liveness from these rows (a process's own stats would only show that process)."""

    name = models.CharField(max_length=200, unique=True, help_text="host:pid")
    host = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    started = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    running = models.PositiveIntegerField(default=0, help_text="Runs on it at its last beat.")
    slots = models.PositiveIntegerField(default=0, help_text="Runs it may take at once.")

    class Meta:
        ordering = ["host", "pid"]

    def __str__(self) -> str:
        return self.name

    BEAT_SECONDS = 15  # a worker counts as gone after three missed beats

    @classmethod
    def beat(cls, name: str, host: str, pid: int, started, running: int, slots: int) -> None:
        """One statement (INSERT ... ON CONFLICT UPDATE): cheap enough for an idle worker."""
        row = cls(
            name=name,
            host=host,
            pid=pid,
            started=started,
            last_seen=timezone.now(),
            running=running,
            slots=slots,
        )
        cls.objects.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["name"],
            update_fields=["last_seen", "running", "slots"],
        )

    @classmethod
    def alive(cls):
        return cls.objects.filter(last_seen__gte=timezone.now() - timedelta(seconds=3 * cls.BEAT_SECONDS))


class Event(models.Model):
    """Append-only; ``(session, seq)`` is unique and gap-free. The row is the truth."""

    # No index of its own: the unique (session, seq) index serves every lookup by session, and one
    # index fewer is one insert fewer per event (sessions/events.py writes thousands a second).
    session = models.ForeignKey(Session, models.CASCADE, related_name="events", db_index=False)
    seq = models.BigIntegerField()
    run = models.ForeignKey(Run, models.SET_NULL, null=True, blank=True, related_name="events")
    type = models.CharField(max_length=40)
    payload = models.JSONField(default=dict)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["session", "seq"]
        constraints = [models.UniqueConstraint(fields=["session", "seq"], name="unique_event_seq")]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.seq} {self.type}"


class SessionBinding(models.Model):
    """An external thread bound to one session, so what arrives in it later is a follow-up.

    ``key`` names the thread the same way for every integration: ``webhook:<source id>:<thread id>``,
    ``slack:<workspace>:<channel>:<thread ts>``, ``github:<owner>/<repo>#<number>``. The unique
    constraint is what makes binding race-safe (sessions/bindings.py).
    """

    team = models.ForeignKey(Team, models.CASCADE, related_name="session_bindings")
    source = models.CharField(max_length=20, choices=Source.choices)
    key = models.CharField(max_length=500)
    session = models.ForeignKey(Session, models.CASCADE, related_name="bindings")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["source", "key"], name="unique_session_binding")]

    def __str__(self) -> str:
        return f"{self.key} -> session {self.session_id}"


def artifact_path(instance: Artifact, filename: str) -> str:
    return f"artifacts/{instance.session_id}/{secrets.token_hex(8)}-{filename}"


class Artifact(models.Model):
    class Kind(models.TextChoices):
        DIFF = "diff"
        CHECKPOINT = "checkpoint"  # the workspace's diff against the base commit, mid-run
        LOG = "log"
        FILE = "file"
        TOOL_OUTPUT = "tool_output"

    session = models.ForeignKey(Session, models.CASCADE, related_name="artifacts")
    run = models.ForeignKey(Run, models.SET_NULL, null=True, blank=True, related_name="artifacts")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=100, default="text/plain")
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    file = models.FileField(upload_to=artifact_path, max_length=500)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["session", "created"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}"


class LLMCall(models.Model):
    class Outcome(models.TextChoices):
        OK = "ok"
        RETRY = "retry"
        ERROR = "error"

    session = models.ForeignKey(Session, models.CASCADE, related_name="llm_calls")
    run = models.ForeignKey(Run, models.SET_NULL, null=True, blank=True, related_name="llm_calls")
    provider = models.CharField(max_length=50)
    model = models.CharField(max_length=200)
    input_tokens = models.IntegerField(default=0)
    output_tokens = models.IntegerField(default=0)
    cached_tokens = models.IntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    latency_ms = models.IntegerField(default=0)
    status_code = models.IntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=10, choices=Outcome.choices, default=Outcome.OK)
    error = models.TextField(blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["session", "created"]
        verbose_name = "LLM call"
        indexes = [models.Index(fields=["created"], name="llmcall_created")]  # monthly team spend


class APIToken(models.Model):
    """Bearer token; only the SHA-256 of the secret is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @staticmethod
    def hash(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str = "") -> tuple[APIToken, str]:
        secret = "dep_" + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=secret[:10], key_hash=cls.hash(secret))
        return token, secret


class RateCounter(models.Model):
    """An API client's requests in the current window of one rate (sessions/api/throttles.py).

    A scratch table: one row per client and rate, reset by each new window; UNLOGGED on Postgres.
    """

    key = models.CharField(max_length=200, primary_key=True)
    window_start = models.BigIntegerField()
    hits = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.key}: {self.hits}"


def default_title(prompt: str) -> str:
    """A session's title when it is given none: its prompt's first line."""
    lines = prompt.strip().splitlines()
    return lines[0][:120] if lines else ""


def session_model(
    model: str = "",
    profile: AgentProfile | None = None,
    environment: Environment | None = None,
    team: Team | None = None,
) -> str:
    """The model a new session runs: the one asked for, then its agent profile's, its environment's
    default, then DEPUTIES_DEFAULT_MODEL; "" when none is set. ``profile``: the one the session
    gets; with ``team`` and no profile, the default one start_session will give it
    (``profiles.default_profile``)."""
    if profile is None and team is not None:
        from sessions.agent.profiles import default_profile

        profile = default_profile(team, environment)
    return (
        model
        or (profile.model if profile is not None else "")
        or (environment.default_model if environment is not None else "")
        or settings.DEFAULT_MODEL
    )


def model_problem(model: str) -> str | None:
    """Why ``model`` cannot be used, or ``None``. It must be ``provider/model`` with a configured provider."""
    providers = sorted(settings.LLM_PROVIDERS)
    configured = ", ".join(providers) if providers else "none (set DEPUTIES_LLM_<NAME>_BASE_URL)"
    provider, sep, name = model.partition("/")
    if not sep or not provider or not name.strip():
        return f"{model!r} is not of the form provider/model; configured providers: {configured}."
    if provider not in settings.LLM_PROVIDERS:
        return f"Unknown provider {provider!r} in {model!r}; configured providers: {configured}."
    return None


def text_problem(value: str, what: str) -> str | None:
    """Why a prompt or a follow-up cannot be sent, or ``None``.

    This and ``model_problem`` are what every way in checks before ``start_session`` (the API, Slack,
    webhooks, ``spawn_session``): here rather than in the API's serializers, so a worker checking a
    child's prompt or a Slack message does not load Django REST framework for it (~12 MB).
    """
    if not value.strip():
        return f"The {what} is empty."
    limit = settings.MAX_PROMPT_CHARS
    if len(value) > limit:
        return f"The {what} is {len(value)} characters long; the limit is {limit}."
    return None


def start_session(
    *,
    team: Team,
    repository: Repository,
    prompt: str,
    model: str,
    created_by=None,
    base_branch: str = "",
    environment: Environment | None = None,
    title: str = "",
    source: str = Source.API,
    external_ref: dict | None = None,
    budget_usd: Decimal | None = None,
    profile: AgentProfile | None = None,
    parent: Session | None = None,
    spawned_by: Run | None = None,
    spawn_call_id: str = "",
) -> Session:
    """Create a session with its first prompt and queue its first run (at commit).

    The returned session carries what ``views.session_queryset()`` annotates (its active run, one
    pending message, no sandbox), so the API shows it without reading it back.
    """
    from sessions.agent.profiles import default_profile
    from sessions.events import emit_many

    profile = profile or default_profile(team, environment)
    if budget_usd is None and profile is not None:
        budget_usd = profile.budget_usd
    session = Session(
        team=team,
        created_by=created_by,
        repository=repository,
        base_branch=base_branch or repository.default_branch,
        environment=environment,
        environment_revision=environment.revision if environment else None,
        budget_usd=budget_usd,
        model=model,
        profile=profile,
        title=title or default_title(prompt),
        source=source,
        external_ref=external_ref or {},
        parent=parent,
        depth=parent.depth + 1 if parent is not None else 0,
        spawned_by=spawned_by,
        spawn_call_id=spawn_call_id,
    )
    with transaction.atomic(savepoint=False):
        if transaction.get_connection().vendor == "postgresql":
            message = Message(session=session, position=1, content=prompt, author=created_by)
            run = Run(session=session, attempt=1)
            _insert_first_rows(session, message, run)
        else:
            session.save(force_insert=True)
            Session.objects.filter(pk=session.pk).update(branch=f"deputies/session-{session.pk}")
            session.branch = f"deputies/session-{session.pk}"
            message = Message.objects.create(session=session, position=1, content=prompt, author=created_by)
            run = None
        emit_many(
            session.pk,
            [
                ("status", {"status": SessionStatus.QUEUED}),
                ("message", {"message_id": message.pk, "content": prompt, "position": 1}),
            ],
        )
        run = session.enqueue_run(first=True, run=run)
    session.active_runs, session.pending_message_count, session.latest_sandboxes = [run], 1, []
    session.child_list = []
    return session


def _insert_fields(model: type[models.Model], skip: str) -> list:
    return [f for f in model._meta.concrete_fields if not f.primary_key and f.name != skip]


# Constant defaults of these types are immutable, so their database value can be prepared once.
_IMMUTABLE = (str, int, bool, Decimal, type(None))


def _field_preps(fields: list, db) -> list[tuple]:
    """``(field, attname, default, its database value)`` per field; ``default`` is a sentinel unless
    the field's default (its own constant, or Django's None or "" without one) is immutable, the
    same object each time ``Model.__init__`` asks for it, and ``pre_save`` returns it as is (not
    ``auto_now``): an instance still holding that very object needs no ``pre_save`` and no
    ``get_db_prep_save`` for it (most of the 53 values of a new session are such defaults)."""
    preps = []
    for f in fields:
        default, value = _NO_DEFAULT, None
        plain_save = type(f).pre_save is models.Field.pre_save or (
            type(f) in (models.DateField, models.DateTimeField) and not (f.auto_now or f.auto_now_add)
        )
        if plain_save and (not f.has_default() or not callable(f.default)):
            first = f.get_default()
            if isinstance(first, _IMMUTABLE) and f.get_default() is first:
                default, value = first, f.get_db_prep_save(first, db)
        preps.append((f, f.attname, default, value))
    return preps


_NO_DEFAULT = object()
_first_rows_sql: tuple[str, list] | None = None


def _insert_first_rows(session: Session, message: Message, run: Run) -> None:
    """Insert the session (with its branch, named after its id), its first message and its first
    run in one statement: the session's id comes from its sequence, in the statement. Values go in
    as Model.save would put them (each field's pre_save, then its database value)."""
    from django.db import connection

    global _first_rows_sql
    if _first_rows_sql is None:
        s_fields = _insert_fields(Session, "branch")
        m_fields, r_fields = _insert_fields(Message, "session"), _insert_fields(Run, "session")

        def cols(fields: list) -> str:
            return ", ".join(connection.ops.quote_name(f.column) for f in fields)

        def vals(fields: list) -> str:
            return ", ".join(["%s"] * len(fields))

        table = Session._meta.db_table
        sql = (
            f"WITH n AS (SELECT nextval(pg_get_serial_sequence('{table}', 'id')) AS id), "
            f'm AS (INSERT INTO "{Message._meta.db_table}" (session_id, {cols(m_fields)}) '
            f"VALUES ((SELECT id FROM n), {vals(m_fields)}) RETURNING id), "
            f'r AS (INSERT INTO "{Run._meta.db_table}" (session_id, {cols(r_fields)}) '
            f"VALUES ((SELECT id FROM n), {vals(r_fields)}) RETURNING id), "
            f'ins AS (INSERT INTO "{table}" (id, {cols(s_fields)}, branch) '
            f"VALUES ((SELECT id FROM n), {vals(s_fields)}, %s || (SELECT id FROM n)::text) RETURNING id) "
            "SELECT (SELECT id FROM ins), (SELECT id FROM m), (SELECT id FROM r)"
        )
        db = transaction.get_connection()
        _first_rows_sql = (sql, [_field_preps(fields, db) for fields in (m_fields, r_fields, s_fields)])
    sql, preps = _first_rows_sql
    # In the order of the placeholders: the message, the run, the session, its branch prefix.
    db = transaction.get_connection()  # not the proxy: its per-thread lookup on each field's use
    params = [
        value if obj.__dict__[attname] is default else f.get_db_prep_save(f.pre_save(obj, True), db)
        for obj, fields in zip((message, run, session), preps, strict=True)
        for f, attname, default, value in fields
    ]
    params.append("deputies/session-")
    with prepared_cursor() as cursor:
        cursor.execute(sql, params)
        session.pk, message.pk, run.pk = cursor.fetchone()
    session.branch = f"deputies/session-{session.pk}"
    message.session_id = run.session_id = session.pk
    for obj in (session, message, run):
        obj._state.adding, obj._state.db = False, connection.alias


# The agent's capabilities (profiles, skills, MCP servers, web results) live in their own module.
from sessions.agent_models import AgentProfile, McpServer, Skill, WebResult  # noqa: E402, F401

# Automations live in their own module; imported here so Django registers their models with the app.
from sessions.automations import Automation, AutomationFiring, ScheduledMessage  # noqa: E402, F401

"""Executes one Run as ordered steps: provision sandbox, prepare repository, agent loop, collect diff,
publish (a GitHub session's branch and pull request).

The runner owns error capture so each step only does its work; a step that raises fails the run
with the error kept on the Run, the Session and a ``run_failed`` event.

Resuming: a run whose worker was lost (``Run.recover_stale``) is claimed again with the next
attempt number and goes on from its checkpoint (``Run.checkpoint``, see sessions/agent/loop.py)
after a ``run_resumed`` event. Its sandbox is reconnected when it is alive; otherwise a new one gets
the base commit the session started from plus the session's latest saved work: the newest ``diff`` or
``checkpoint`` artifact (the workspace's diff against that commit, redacted like every diff). The
same restore gives a follow-up whose sandbox was reaped the work of the runs before it. A step that
changed no file saves no checkpoint (``after_step``), so a resumed attempt with none is given the
commit its lost attempt prepared, not the base branch's newer tip.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection
from django.utils import timezone

from sandboxes.base import SandboxHandle, SandboxSpec, get_provider, secrets_withheld_reason
from sandboxes.models import Sandbox
from sessions import repocache
from sessions.artifacts import store_artifact
from sessions.cancels import CancellingHandle
from sessions.events import emit, emit_many
from sessions.models import Artifact, Message, Run, Session, Source
from sessions.repository_urls import CheckedRepository, RepositoryRefused, check_repository_url
from sessions.secrets import RedactingHandle, Redactor, SecretError, sandbox_environment
from sessions.storage import ArtifactStorageError
from sessions.workpool import heartbeat, releasing_handle, releasing_llm

log = logging.getLogger(__name__)

BASE_REF = "refs/deputies/base"
SETUP_SCRIPT = ".deputies/setup"
# Tools that never write to the workspace (sessions/agent/tools.py); ``bash`` may do anything.
READ_ONLY_TOOLS = ("read_file", "list_files", "grep", "todo_write", "report_progress", "finish")
# Worker tools (sessions/agent/toolset.py) never touch the workspace either.
READ_ONLY_TOOLS += ("load_skill", "web_fetch", "web_search")
# Setup output is coalesced into events of at most this size, at most this often per stream.
SETUP_FLUSH_CHARS = 4096
SETUP_FLUSH_SECONDS = 0.2


def worker_id() -> str:
    """The lease owner: this host and process (computed each time: django-q2 forks its workers)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StepFailed(Exception):
    """A step failed in a way the user can act on; the message is shown as the run's error."""


def git(
    *args: str,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    source: CheckedRepository | None = None,
) -> str:
    """Run git on the worker, hardened: no hooks, no fsmonitor, no submodules, and no transport at
    all unless ``source`` (a repository URL checked just before, see ``repository_source``) names
    the one this command may use. So nothing in a repository's config, a redirect or a submodule
    can make git reach a place nobody checked. Without ``cwd`` git runs in ``/``, never inside
    whatever repository the worker was started from (its config could set ``core.sshCommand``)."""
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        # Protocols marked "user" (file, by default) are never allowed: only the list below counts.
        "GIT_PROTOCOL_FROM_USER": "0",
        "GIT_AUTHOR_NAME": "Deputies",
        "GIT_AUTHOR_EMAIL": "deputies@localhost",
        "GIT_COMMITTER_NAME": "Deputies",
        "GIT_COMMITTER_EMAIL": "deputies@localhost",
        "LC_ALL": "C",
        **(env or {}),
    }
    config = [
        "safe.directory=*",
        "core.hooksPath=/dev/null",
        "core.fsmonitor=false",
        "protocol.ext.allow=never",
        "submodule.recurse=false",
        "fetch.recurseSubmodules=false",
        *(source.git_config() if source is not None else ["protocol.allow=never"]),
    ]
    hardening = [arg for value in config for arg in ("-c", value)]
    proc = subprocess.run(
        ["git", *hardening, *args],
        cwd=cwd if cwd is not None else "/",
        env=base_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise StepFailed(f"git {args[0]} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


def repository_source(url: str) -> CheckedRepository:
    """Check a stored repository URL again, right before git talks to it: DNS may have changed
    since it was submitted, and rows older than the rules (or than a settings change) are refused
    here with the reason as the run's error."""
    try:
        return check_repository_url(url)
    except RepositoryRefused as exc:
        raise StepFailed(f"the repository {url!r} is refused: {exc}") from None


def claim(run_id: int, ack_id: int | None = None) -> tuple[Run | None, str]:
    """Load and claim a run: (the run, "claimed"), or (None, why not).

    Claiming is a conditional update, so a duplicate delivery is a no-op. ``ack_id``, the run's
    queue task, is acknowledged once the claim is decided (in the claim's own statement when the
    queue shares its database): from then on the run's lease is what protects it, and a worker lost
    before that leaves the task to the queue's retry (``DEPUTIES_RUN_LEASE``, deputies/broker.py).
    """
    from deputies.broker import acknowledge, queue_joins_transaction

    owner = worker_id()
    why = None
    if connection.vendor == "postgresql":  # one statement, unless the run's team has a limit
        joined = ack_id is not None and queue_joins_transaction()
        run, status = Run.claim_loaded(run_id, owner, ack=ack_id if joined else None)
        if status != Run.LIMITED:
            ack_id = None if joined else ack_id  # acknowledged with the claim
            why = (
                "claimed" if run is not None else "missing" if status is None else f"skipped: run is {status}"
            )
    if why is None:
        run, why = _claim_orm(run_id, owner)
    if ack_id is not None:
        acknowledge(ack_id)
    return run, why


def _claim_orm(run_id: int, owner: str) -> tuple[Run | None, str]:
    try:
        run = Run.objects.select_related(
            "session__repository", "session__environment", "session__team", "session__profile"
        ).get(pk=run_id)
    except Run.DoesNotExist:
        return None, "missing"
    if not run.claim(owner):
        if run.waiting_for_team:  # queued again when a slot frees (sessions/limits.py)
            return None, "waiting: its team is at its concurrency limit"
        return None, f"skipped: run is {run.status}"
    return run, "claimed"


def execute(run_id: int) -> str:
    """Claim and run to the end on this thread (sync queue mode, tests, ``deputies run``)."""
    run, why = claim(run_id)
    return Runner(run).execute() if run is not None else why


_sandbox_insert: tuple[str, list] | None = None


def insert_sandbox_with_events(row: Sandbox, items: list[tuple[str, dict]], run_id: int) -> None:
    """Postgres: insert the sandbox's row in the statement of ``items``, its session's events (one
    round trip and one commit for both). Values go in as ``Model.save`` would put them."""
    from sessions.events import emit_many_with

    global _sandbox_insert
    if _sandbox_insert is None:
        fields = [f for f in Sandbox._meta.concrete_fields if not f.primary_key]
        columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        values = ", ".join(f"%(sb{n})s" for n in range(len(fields)))
        sql = f'INSERT INTO "{Sandbox._meta.db_table}" ({columns}) VALUES ({values}) RETURNING id'
        _sandbox_insert = (sql, fields)
    sql, fields = _sandbox_insert
    params = {f"sb{n}": f.get_db_prep_save(f.pre_save(row, True), connection) for n, f in enumerate(fields)}
    _events, inserted = emit_many_with(row.session_id, items, run_id, sql, params)
    row.pk = inserted["id"]
    row._state.adding, row._state.db = False, DEFAULT_DB_ALIAS


def extract_workspace(data: bytes, tree: Path) -> None:
    """Unpack a workspace archive for diffing: no ``.git``, nothing written through a link.

    Files and directories go through tarfile's ``data`` filter; symlinks (which may point anywhere,
    that is the agent's business and shows in the diff) are created last, as links, never followed.
    """
    links = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = []
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if name == ".git" or name.startswith(".git/"):
                continue
            if m.issym():
                links.append((name, m.linkname))
            elif m.isfile() or m.isdir():
                members.append(m)
        tar.extractall(tree, members=members, filter="data")
    root = tree.resolve()
    for name, target in links:
        path = tree / name
        if not path.parent.resolve().is_relative_to(root) or path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)


def workspace_stamp(handle) -> tuple | None:
    """The sandbox's cheap fingerprint of its workspace files (``LocalHandle.tree_stamp``), or None
    when its provider has none or cannot tell: then the workspace is diffed as before."""
    stamp = getattr(handle, "tree_stamp", None)
    return stamp() if stamp is not None else None


def checkouts_root() -> Path:
    return Path(settings.DATA_DIR) / "checkouts"


def checkout_dir(session_id: int) -> Path:
    """The worker's trusted clone for a session; the sandbox's own .git is never trusted."""
    return checkouts_root() / f"session-{session_id}"


def template_link(session_id: int) -> Path:
    """A link to the repository template a session's sandbox was given: the reaper keeps what it
    names, as it keeps what a checkout borrows (its checkout is written from it on first use)."""
    return checkouts_root() / f"session-{session_id}.template"


class SetupOutput:
    """Buffers a setup script's output per stream and emits it in coalesced ``setup_output`` events.

    A buffer is flushed when it reaches ``SETUP_FLUSH_CHARS`` characters, when the other stream speaks (so the
    interleaving stays readable), or on the next write after ``SETUP_FLUSH_SECONDS``. Writes only
    happen on the exec's thread, so output that stops mid-way waits for the next write or the end.
    """

    def __init__(self, emit, run: Run) -> None:
        self.emit = emit
        self.run = run
        self.pending: list[tuple[str, str]] = []
        self.pending_size = 0
        self.last_flush = time.monotonic()
        self.last_beat = time.monotonic()
        self.full: list[str] = []

    def write(self, stream: str, text: str) -> None:
        self.full.append(text)
        if self.pending and self.pending[-1][0] != stream:
            self.flush()
        self.pending.append((stream, text))
        self.pending_size += len(text)
        now = time.monotonic()
        if self.pending_size >= SETUP_FLUSH_CHARS or now - self.last_flush >= SETUP_FLUSH_SECONDS:
            self.flush()
        if now - self.last_beat >= 30:  # a long setup is still a live run
            self.last_beat = now
            self.run.beat()

    def flush(self) -> None:
        if not self.pending:
            return
        stream = self.pending[0][0]
        text = "".join(t for _, t in self.pending)
        self.pending, self.pending_size = [], 0
        self.last_flush = time.monotonic()
        for start in range(0, len(text), SETUP_FLUSH_CHARS):
            self.emit("setup_output", {"stream": stream, "text": text[start : start + SETUP_FLUSH_CHARS]})

    def log(self) -> str:
        return "".join(self.full)


def fresh_dir(path: Path) -> None:
    """Make ``path`` absent with its parent present, ready for a clone."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)


class Runner:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.session: Session = run.session
        self.sandbox: Sandbox | None = None
        self.handle: SandboxHandle | None = None
        self.redactor: Redactor | None = None
        # Events held back to share the next one's statement (sandbox_ready waits for
        # repository_ready); written, in order, before any other event of the run.
        self.held: list[tuple[str, dict]] = []
        self.hold_sandbox_ready = False  # execute() sets it: repository_ready always follows there
        self.remote = None  # credentials for the remote (remote_credentials()), worker-side only
        self.tree: str | None = None  # the workspace's tree, written by collect_diff
        self.reconnected = False  # the sandbox was alive and reused
        self.restored: Artifact | None = None  # the saved work a new sandbox was given
        self.unsaved_steps = 0  # steps that may have changed the workspace since its last checkpoint
        # The workspace's files (the handle's tree_stamp) when they were last saved, or known to be
        # what a recovery rebuilds without a checkpoint: a step that left them so saves nothing.
        self.saved_stamp: tuple | None = None
        # The repository's files on this host, as prepare_repository gave them to the sandbox (a
        # template, or the trusted checkout when cloned): what decides on the setup script.
        self.repository_tree: Path | None = None
        self.prepared_commit: str | None = None  # the commit this run gave a new sandbox

    def emit(self, type: str, payload: dict) -> None:
        if self.held:
            self.held.append((type, payload))
            self.flush_held()
        else:
            emit(self.session.pk, type, payload, run_id=self.run.pk)

    def flush_held(self) -> None:
        held, self.held = self.held, []
        if held:
            emit_many(self.session.pk, held, run_id=self.run.pk)

    def execute(self) -> str:
        """Run the steps while this process keeps the run's lease (one heartbeat for all its runs)."""
        with heartbeat().beating(self.run.pk):
            return self.run_steps()

    def run_steps(self) -> str:
        result = None
        try:
            pristine = False  # the workspace is exactly the base commit
            self.hold_sandbox_ready = True
            fresh = self.provision_sandbox()
            if fresh or self.sandbox.prepared is None:
                saved = self.saved_work()
                commit = None
                if saved is not None:
                    commit = self.base_commit()
                elif self.run.recovered:  # the tree the lost attempt's steps saw (see after_step)
                    commit = self.base_commit(run_id=self.run.pk)
                self.prepare_repository(commit=commit)
                self.run_setup_script()
                if saved is not None:
                    self.save_sandbox()
                    self.restore_workspace(saved)
                pristine = saved is None and not self.setup_script().exists()
                self.sandbox.prepared = timezone.now()
                self.save_sandbox("prepared")
                environment = self.session.environment
                if pristine and not (environment and environment.setup_script.strip()):
                    self.saved_stamp = workspace_stamp(self.handle)  # what a new sandbox would get
            else:
                self.reconnected = True
            if self.run.recovered:
                self.flush_held()
                self.emit(
                    "run_resumed",
                    {
                        "run_id": self.run.pk,
                        "attempt": self.run.attempt,
                        "from_step": self.run.checkpoint.get("steps", 0),
                        "sandbox": "reconnected" if self.reconnected else "recreated",
                        "restored_artifact_id": self.restored.pk if self.restored else None,
                    },
                )
            result = self.agent_loop()
            if not (pristine and self.left_workspace_alone(result)):
                self.collect_diff()
            if result.status == "completed":
                self.publish(result)
        except Exception as exc:  # the runner owns error capture
            log.exception("run %s failed", self.run.pk)
            self.flush_held()
            if result is not None:
                self.save_transcript(result)
            self.save_sandbox()
            return self.fail(exc)
        if result.status == "completed":
            # The transcript, the summary, the run's end and its events: one transaction.
            if self.run.finish(
                Run.Status.COMPLETED,
                session_fields={"transcript": result.transcript, "summary": result.summary},
                events=[
                    ("run_completed", {"run_id": self.run.pk, "summary": result.summary}),
                    ("status", {"status": "completed"}),
                ],
                sandbox_id=self.sandbox.pk,
            ):
                self.name_session(result.summary)
                return "completed"
            self.save_transcript(result)
            return "cancelled"  # closed under us: only a cancel does that
        self.save_transcript(result)
        if result.status == "cancelled":
            Sandbox.objects.filter(pk=self.sandbox.pk).update(last_used=timezone.now())
            return "cancelled"
        return self.fail(StepFailed(result.error or "the agent stopped without finishing"))

    def name_session(self, summary: str) -> None:
        """A title from the cheaper summary model, after the first run (sessions/agent/titles.py)."""
        from sessions.agent.titles import title_session, wants_title

        try:
            if wants_title(self.run):
                title_session(self.run, summary)
        except Exception:  # the run has completed; a title is not worth failing anything for
            log.exception("session %s: naming it failed", self.session.pk)

    def save_transcript(self, result) -> None:
        Session.objects.filter(pk=self.session.pk).update(transcript=result.transcript)

    @staticmethod
    def left_workspace_alone(result) -> bool:
        """Whether this run called only tools that cannot change the workspace: then the diff of a
        pristine workspace is empty, and pulling the workspace out to find that is skipped."""
        return all(name in READ_ONLY_TOOLS for name in result.tools_called)

    def fail(self, exc: Exception) -> str:
        error = (
            str(exc) if isinstance(exc, StepFailed | ArtifactStorageError) else f"{type(exc).__name__}: {exc}"
        )
        events = [("run_failed", {"run_id": self.run.pk, "error": error}), ("status", {"status": "failed"})]
        sandbox_id = self.sandbox.pk if self.sandbox is not None else None
        if self.run.finish(Run.Status.FAILED, error, events=events, sandbox_id=sandbox_id):
            return "failed"
        return "cancelled"

    def save_sandbox(self, *fields: str) -> None:
        """Write the sandbox's row: all of it the first time (a local sandbox's row is written
        once, prepared; on Postgres in the statement of the events held back till then), else
        ``fields``. A step that may take long saves it first, so the row is there while the sandbox
        is in use (the reaper leaves alone the sandboxes rows name)."""
        if self.sandbox is None:
            return
        if self.sandbox.pk is None:
            if self.held and connection.vendor == "postgresql":
                held, self.held = self.held, []
                try:
                    insert_sandbox_with_events(self.sandbox, held, self.run.pk)
                except Exception:
                    self.held = held  # neither was written: the failure's path writes them
                    raise
            else:
                self.sandbox.save(force_insert=True)
        elif fields:
            Sandbox.objects.filter(pk=self.sandbox.pk).update(**{f: getattr(self.sandbox, f) for f in fields})

    # --- steps ----------------------------------------------------------------------------------

    def provision_sandbox(self) -> bool:
        """Reuse the session's live sandbox for follow-ups; returns True when a new one was made."""
        env = self.session.environment
        try:
            secrets = env.decrypted_secrets() if env else []
        except SecretError as exc:
            raise StepFailed(str(exc)) from None
        self.remote = self.remote_credentials()
        self.redactor = Redactor([*secrets, *(self.remote.secrets if self.remote else [])])
        provider = get_provider(env.sandbox_provider if env and env.sandbox_provider else None)
        caps = provider.capabilities()
        sandbox_env, withheld = sandbox_environment(env, secrets, caps)
        live = None
        if self.run.attempt > 1:  # a session's first run (see saved_work) has none to reuse
            live = self.session.sandboxes.filter(status=Sandbox.Status.READY, provider=provider.name).first()
        if live is not None:
            try:
                self.handle = self.scrubbed(provider.connect(live.external_id, env=sandbox_env))
                self.sandbox = live
                return False
            except Exception as exc:
                log.warning("sandbox %s is gone (%s); making a new one", live.external_id, exc)
                Sandbox.objects.filter(pk=live.pk).update(
                    status=Sandbox.Status.DESTROYED, destroyed=timezone.now()
                )
        spec = SandboxSpec(
            session_id=self.session.pk,
            image=env.image if env else "",
            env=sandbox_env,
            network=env.network_policy if env else "none",
            cpu_limit=env.cpu_limit if env else None,
            memory_mb=env.memory_mb if env else None,
            labels={"deputies.session": str(self.session.pk)},
        )
        # In a run (run_steps, which prepares the repository right after), a sandbox that is quick
        # to create gets its row once it is ready and prepared (save_sandbox): one whose worker
        # dies before that has no row, and the reaper's orphan sweep removes it
        # (sandboxes/reaper.py). A slow create (an image pull) shows as creating meanwhile.
        row = Sandbox(
            session=self.session,
            provider=provider.name,
            isolated=caps.isolated,
            isolation_note=caps.reason[:300],
            status=Sandbox.Status.CREATING,
        )
        if caps.slow_create:
            row.save(force_insert=True)
        try:
            handle = provider.create(spec)
        except Exception as exc:
            row.status, row.error = Sandbox.Status.FAILED, str(exc)[:2000]
            row.save()
            raise StepFailed(f"could not create the sandbox: {exc}") from exc
        row.status, row.external_id, row.last_used = Sandbox.Status.READY, handle.id, timezone.now()
        if row.pk is not None:
            row.save(update_fields=["status", "external_id", "last_used"])
        elif not self.hold_sandbox_ready:  # a step on its own: nothing else would write it
            row.save(force_insert=True)
        self.sandbox = row
        self.handle = self.scrubbed(handle)
        payload = {"sandbox_id": self.handle.id, "provider": provider.name, "isolated": caps.isolated}
        if not caps.isolated:
            payload["reason"] = caps.reason
        if withheld:  # names only; the run goes on without them
            payload["secrets_withheld"] = withheld
            payload["secrets_withheld_reason"] = secrets_withheld_reason(caps)
        if self.hold_sandbox_ready:
            self.held.append(("sandbox_ready", payload))  # written with repository_ready (or the failure)
        else:
            self.emit("sandbox_ready", payload)
        return True

    def scrubbed(self, handle: SandboxHandle) -> SandboxHandle:
        """What the sandbox says passes through the secrets' redactor before anyone sees it, and its
        commands are killed as soon as the run is cancelled (sessions/cancels.py)."""
        handle = CancellingHandle(handle, self.run.pk)
        return RedactingHandle(handle, self.redactor) if self.redactor else handle

    def checkout_dir(self) -> Path:
        return checkout_dir(self.session.pk)

    def remote_credentials(self):
        """What the worker's git needs for a private remote (a GitHub installation token, as
        environment for git: integrations/github/publish.py), or None. Never in .git/config or the
        sandbox; the values are added to the run's redactor."""
        if self.session.source != Source.GITHUB:
            return None
        from integrations.github.publish import credentials

        try:
            return credentials(self.session)
        except Exception as exc:
            raise StepFailed(f"no GitHub token for the repository: {type(exc).__name__}: {exc}") from None

    def git_env(self) -> dict[str, str] | None:
        return self.remote.env if self.remote else None

    def publish(self, result) -> None:
        """Publish step: a GitHub session's changes become a commit on its branch, pushed, and a
        pull request opened or updated (integrations/github/publish.py). Other sessions keep their
        diff artifact only."""
        if self.remote is None or self.session.source != Source.GITHUB:
            return
        from integrations.github.publish import publish

        publish(self, result)

    def prepare_repository(self, commit: str | None = None) -> None:
        """Upload the base branch's tip (or ``commit``) on the session's branch; the worker fetches
        it (credentials never enter the sandbox), from this host's per-commit template
        (sessions/repocache.py). The trusted checkout is written from the template when something
        first needs it (trusted_checkout): most runs of a session that changes nothing never do."""
        repo = self.session.repository
        checkout = self.checkout_dir()
        fresh_dir(checkout)
        commit = commit or repocache.resolve(repo.url, self.session.base_branch, env=self.git_env())
        if commit is None:  # not a branch (a tag, say): what `git clone --branch` accepts, the slow way
            commit = self.clone_and_upload(checkout)
            self.repository_tree = checkout
        else:
            template = repocache.template(repo.url, self.session.base_branch, commit, env=self.git_env())
            repocache.upload(self.handle, template, self.session.branch, commit, BASE_REF)
            self.repository_tree = template
            link = template_link(self.session.pk)
            link.unlink(missing_ok=True)
            os.symlink(template, link)
        self.prepared_commit = commit
        ready = {"url": repo.url, "base_branch": self.session.base_branch, "branch": self.session.branch,
                 "commit": commit}  # fmt: skip
        if self.held and self.sandbox.pk is None and connection.vendor == "postgresql":  # see save_sandbox
            self.held.append(("repository_ready", ready))
        else:
            self.emit("repository_ready", ready)

    def clone_and_upload(self, checkout: Path) -> str:
        source = repository_source(self.session.repository.url)
        git(
            "clone",
            "--quiet",
            "--no-hardlinks",
            "--branch",
            self.session.base_branch,
            "--",
            source.url,
            str(checkout),
            source=source,
            env=self.git_env(),
        )
        commit = git("rev-parse", "HEAD", cwd=checkout).strip()
        git("update-ref", BASE_REF, commit, cwd=checkout)
        git("checkout", "--quiet", "-b", self.session.branch, cwd=checkout)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for entry in sorted(os.listdir(checkout)):
                tar.add(checkout / entry, arcname=entry)
        self.handle.put_archive(".", buffer.getvalue())
        return commit

    def setup_script(self) -> Path:
        """The repository's ``.deputies/setup`` as the sandbox got it (maybe absent)."""
        return (self.repository_tree or self.checkout_dir()) / SETUP_SCRIPT

    def run_setup_script(self) -> None:
        """Run the environment's setup script, then the repository's ``.deputies/setup``, once per
        fresh sandbox, before the agent starts.

        The worker's trusted checkout decides whether the repository has a script (the sandbox's
        copy is the same tree, just uploaded). Output is coalesced into ``setup_output`` events so a
        chatty ``pip install`` writes dozens of rows, not thousands; the whole log is always kept as
        an artifact, because a failing setup is debugged from it.
        """
        scripts: list[tuple[str, list[str]]] = []
        environment = self.session.environment
        if environment is not None and environment.setup_script.strip():
            scripts.append(("environment setup script", ["sh", "-c", environment.setup_script, "setup"]))
        script = self.setup_script()
        if script.is_file() or script.is_symlink():
            argv = [f"./{SETUP_SCRIPT}"] if os.access(script, os.X_OK) else ["sh", SETUP_SCRIPT]
            scripts.append((f"repository setup script {SETUP_SCRIPT}", argv))
        if not scripts:
            return
        self.save_sandbox()  # a setup script may take long
        timeout = settings.SETUP_TIMEOUT
        output = SetupOutput(self.emit, self.run)
        try:
            for label, argv in scripts:
                started = time.monotonic()
                result = self.handle.exec(argv, timeout=timeout, on_output=output.write)
                output.flush()
                self.emit(
                    "setup_finished",
                    {
                        "script": label,
                        "exit_code": result.exit_code,
                        "duration": round(time.monotonic() - started, 3),
                        "timed_out": result.timed_out,
                    },
                )
                if result.cancelled:
                    raise StepFailed(f"{label} was stopped: the run was cancelled")
                if result.timed_out:
                    raise StepFailed(
                        f"{label} timed out after {timeout:g} s (DEPUTIES_SETUP_TIMEOUT); see the setup log"
                    )
                if result.exit_code != 0:
                    raise StepFailed(f"{label} failed with exit code {result.exit_code}; see the setup log")
        finally:
            output.flush()
            store_artifact(
                self.session.pk,
                "log",
                f"session-{self.session.pk}-run-{self.run.attempt}-setup.log",
                output.log(),
                run_id=self.run.pk,
            )

    def agent_loop(self):
        with self.agent_toolset() as toolset:  # its MCP sessions last as long as the loop
            return self.drive_agent(toolset)

    def drive_agent(self, toolset):
        from sessions.agent.llm import LLMError, client_for
        from sessions.agent.loop import AgentResult, build_system_prompt, run_agent

        session = self.session
        checkpoint = self.run.checkpoint
        if checkpoint.get("transcript"):  # a recovered attempt: where the lost one got to
            transcript = list(checkpoint["transcript"])
            self.run.steps = checkpoint.get("steps", 0)
        else:
            # The claim loaded the session (repository, environment); only the transcript may be
            # newer: an earlier run may still be saving it (a cancelled one, say).
            if not self.run.only_run:
                session.transcript = Session.objects.values_list("transcript", flat=True).get(pk=session.pk)
            transcript = list(session.transcript) or [
                {"role": "system", "content": build_system_prompt(session, self.handle, toolset)}
            ]
            prompts = self.run.claimed_prompts  # what the claim took, when it says
            if prompts is None:
                claimed = self.run.messages.filter(status=Message.Status.CLAIMED).order_by("position")
                prompts = [message.content for message in claimed]
            transcript += [{"role": "user", "content": content} for content in prompts]
        try:
            llm = releasing_llm(client_for(session.model))
        except LLMError as exc:
            result = AgentResult("failed", transcript=transcript, error=str(exc))
        else:
            try:  # the run's DB connection goes back to the pool while the model or a command works
                result = run_agent(
                    self.run,
                    releasing_handle(self.handle),
                    transcript,
                    client=llm,
                    save_steps=False,  # steps are saved by every way the run ends (Run.finish)
                    todos=checkpoint.get("todos"),
                    after_step=self.after_step if settings.CHECKPOINT_EVERY else None,
                    toolset=toolset,
                )
            finally:
                llm.close()
        return result

    def agent_toolset(self):
        """The run's tools, skills and step limit, shaped by the session's agent profile
        (sessions/agent/toolset.py); repository skills are read from the trusted checkout."""
        from sessions.agent.toolset import build_toolset

        return build_toolset(self.run, self.handle, self.redactor, self.checkout_dir(), emit=self.emit)

    def collect_diff(self) -> None:
        diff = self.workspace_diff()
        if diff.strip():
            store_artifact(
                self.session.pk,
                "diff",
                f"session-{self.session.pk}-run-{self.run.attempt}.diff",
                diff,
                run_id=self.run.pk,
                content_type="text/x-diff; charset=utf-8",
            )

    def workspace_diff(self) -> str:
        """Pull the workspace out and diff it against the base commit using the worker's own .git.

        Only regular files and directories come back, and the sandbox's ``.git`` is dropped: a
        hostile ``.git/config`` (hooks, fsmonitor) must never run on the worker.
        """
        checkout = self.trusted_checkout()
        data = self.handle.get_archive(".")
        with tempfile.TemporaryDirectory(prefix="deputies-diff-") as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            extract_workspace(data, tree)
            trusted = ["--git-dir", str(checkout / ".git"), "--work-tree", str(tree)]
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(*trusted, "read-tree", BASE_REF, env=index)
            git(*trusted, "add", "-A", env=index)
            diff = git(*trusted, "diff", "--cached", "--binary", BASE_REF, env=index)
            if self.remote is not None:  # the publish step commits this tree
                self.tree = git(*trusted, "write-tree", env=index).strip()
        if self.redactor:
            diff = self.redactor.text(diff)
        return diff

    # --- resuming -------------------------------------------------------------------------------

    def after_step(self, tools: list[str], before_saving: Callable[[], None] | None = None) -> None:
        """Save the workspace every DEPUTIES_CHECKPOINT_EVERY steps that may have changed it,
        unless its files are as they were saved last (or, from a pristine start, as a recovery's
        new sandbox would have them): a step that changed nothing costs a stat walk, not a diff.

        An empty diff is saved too: it says the work so far was undone, so an older one must not
        be restored. ``before_saving`` writes what the loop held back of the step (its last
        tool_finished, otherwise written with the next heartbeat), so it is shown first.
        """
        if any(name not in READ_ONLY_TOOLS for name in tools):
            self.unsaved_steps += 1
        if self.unsaved_steps < settings.CHECKPOINT_EVERY:
            return
        self.unsaved_steps = 0
        stamp = workspace_stamp(self.handle)  # before the diff: a change meanwhile shows next time
        if stamp is not None and stamp == self.saved_stamp:
            return  # the files are as saved: a checkpoint would say what the last one says
        if before_saving is not None:
            before_saving()
        store_artifact(
            self.session.pk,
            Artifact.Kind.CHECKPOINT,
            f"session-{self.session.pk}-run-{self.run.attempt}-step-{self.run.steps}.diff",
            self.workspace_diff(),
            run_id=self.run.pk,
            content_type="text/x-diff; charset=utf-8",
        )
        self.saved_stamp = stamp

    def saved_work(self) -> Artifact | None:
        """The session's latest saved workspace, for a new sandbox of a session that had one before.

        A session's first run (attempt 1, never recovered) has none, and asks nothing.
        """
        if self.run.attempt == 1:
            return None
        return (
            Artifact.objects.filter(
                session_id=self.session.pk, kind__in=(Artifact.Kind.DIFF, Artifact.Kind.CHECKPOINT)
            )
            .order_by("-created", "-pk")
            .first()
        )

    def base_commit(self, run_id: int | None = None) -> str | None:
        """The commit the session's saved work was diffed against (its last prepared repository),
        or the one ``run_id`` last prepared."""
        ready = self.session.events.filter(type="repository_ready")
        if run_id is not None:
            ready = ready.filter(run_id=run_id)
        ready = ready.order_by("-seq").first()
        return ready.payload["commit"] if ready is not None else None

    def restore_workspace(self, artifact: Artifact) -> None:
        """Apply a saved diff to the freshly prepared workspace.

        The patch is applied on the worker, to the base tree taken from the trusted checkout (the
        sandbox may have no git); then the files it adds or changes are uploaded and those it
        deletes are removed in the sandbox.
        """
        with artifact.file.open("rb") as fh:
            patch = fh.read()
        self.restored = artifact
        if not patch.strip():
            self.emit("workspace_restored", {"artifact_id": artifact.pk, "changed": 0, "deleted": 0})
            return
        checkout = self.trusted_checkout()
        with tempfile.TemporaryDirectory(prefix="deputies-restore-") as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            (Path(tmp) / "patch").write_bytes(patch)
            trusted = ["--git-dir", str(checkout / ".git"), "--work-tree", str(tree)]
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(*trusted, "read-tree", "--reset", "-u", BASE_REF, env=index)  # index and tree, stat-fresh
            try:
                git(*trusted, "apply", "--index", "--binary", str(Path(tmp) / "patch"), cwd=tree, env=index)
            except StepFailed as exc:
                raise StepFailed(
                    f"could not restore the session's saved work (artifact {artifact.pk}) in a new sandbox: {exc}"
                ) from None
            status = git(*trusted, "diff-index", "--cached", "--no-renames", "--name-status", "-z", BASE_REF,
                         env=index)  # fmt: skip
            fields = status.split("\0")
            changed, deleted = [], []
            for code, path in zip(fields[0::2], fields[1::2], strict=False):
                (deleted if code == "D" else changed).append(path)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in changed:
                    tar.add(tree / path, arcname=path, recursive=False)  # links stay links
        if changed:
            self.handle.put_archive(".", buffer.getvalue())
        if deleted:
            result = self.handle.exec(["rm", "-f", "--", *deleted], timeout=120)
            if result.exit_code != 0:
                raise StepFailed(
                    f"could not restore the session's saved work: rm failed: {result.output[-500:]}"
                )
        self.emit(
            "workspace_restored",
            {"artifact_id": artifact.pk, "changed": len(changed), "deleted": len(deleted)},
        )

    def trusted_checkout(self) -> Path:
        """The session's trusted checkout (the diff and the restore run git in it), written on
        first use: prepare_repository leaves it to whoever needs it."""
        checkout = self.checkout_dir()
        if not (checkout / ".git").exists():
            self.restore_checkout(checkout)
        return checkout

    def restore_checkout(self, checkout: Path) -> None:
        """The trusted checkout of the commit the sandbox was given (this run's, else the recorded
        one: a follow-up, maybe on another worker host): a ``.git`` borrowing that commit's template,
        or, when no template can be made (the base branch moved past it), a clone pinned to it."""
        commit = self.prepared_commit
        if commit is None:
            ready = self.session.events.filter(type="repository_ready").order_by("-seq").first()
            if ready is None:
                raise StepFailed("the repository was never prepared for this session")
            commit = ready.payload["commit"]
        # Written beside it and renamed into place: a worker killed halfway leaves only the partial
        # one (written again next time, or reaped), never a checkout whose .git git cannot read.
        partial = checkout.with_name(checkout.name + ".partial")
        fresh_dir(partial)
        self.write_trusted_checkout(partial, commit)
        if checkout.exists():
            shutil.rmtree(checkout)
        os.rename(partial, checkout)

    def write_trusted_checkout(self, checkout: Path, commit: str) -> None:
        url, branch = self.session.repository.url, self.session.branch
        try:
            template = repocache.template(url, self.session.base_branch, commit, env=self.git_env())
        except StepFailed:
            pass
        else:
            repocache.write_checkout(checkout, template, branch, commit, BASE_REF)
            return
        source = repository_source(url)
        git(
            "clone",
            "--quiet",
            "--no-checkout",
            "--no-hardlinks",
            "--",
            source.url,
            str(checkout),
            source=source,
            env=self.git_env(),
        )
        git("update-ref", BASE_REF, commit, cwd=checkout)

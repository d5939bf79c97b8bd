"""The ``deputies`` command: Simple mode, the web and worker processes, and a terminal client.

Errors a user can fix are printed as one line naming the problem; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
TERMINAL = {"completed", "failed", "cancelled", "archived"}


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deputies.settings")
    import django
    from django.core.exceptions import ImproperlyConfigured

    try:
        django.setup()
    except ImproperlyConfigured as exc:
        raise CLIError(f"configuration error: {exc}") from None


# --- up ------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    setup_django()
    from django.conf import settings
    from django.core.management import call_command

    print(f"deputies: data in {settings.DATA_DIR}", flush=True)
    call_command("migrate", interactive=False, verbosity=0)
    username, password = ensure_admin(Path(settings.DATA_DIR))
    env = dict(os.environ)
    fake = None
    if not settings.LLM_PROVIDERS:
        fake, repo_path = start_demo(env, Path(settings.DATA_DIR), username)
        print("deputies: no LLM provider is configured (DEPUTIES_LLM_OPENAI_API_KEY, ...).", flush=True)
        print(f"deputies: using the SCRIPTED DEMO MODEL (not a real LLM) at {fake.base_url}", flush=True)
        print(f"deputies: sample repository with a failing test: {repo_path}", flush=True)
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "deputies.cli", "web", "--host", args.host, "--port", str(args.port)],
            env=env,
        ),
        subprocess.Popen([sys.executable, "-m", "deputies.cli", "worker"], env=env),
    ]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"\nDeputies is starting at http://{host}:{args.port}/\n"
        f"  log in at http://{host}:{args.port}/ as {username!r} with password {password!r}\n"
        f"  operator console (Django admin): http://{host}:{args.port}/admin/\n"
        f"  API docs: http://{host}:{args.port}/api/docs/\n"
        f"  try it:   .venv/bin/deputies run --repo {Path(settings.DATA_DIR) / 'sample-repo'} "
        '"Make the failing test pass"\n'
        "  stop with Ctrl-C\n",
        flush=True,
    )
    return supervise(children, fake)


def supervise(children: list[subprocess.Popen], fake=None) -> int:
    from deputies.stopping import set_on_signals

    stopping = threading.Event()
    set_on_signals(stopping)
    code = 0
    while not stopping.is_set():
        for child in children:
            if child.poll() is not None:
                print(
                    f"deputies: a child process exited with status {child.returncode}; stopping", flush=True
                )
                code = child.returncode or 1
                stopping.set()
        stopping.wait(0.5)
    print("deputies: stopping", flush=True)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if fake is not None:
        fake.close()
    print("deputies: stopped", flush=True)
    return code


def ensure_admin(data_dir: Path) -> tuple[str, str]:
    """Make the admin account and its team once; the first password is kept (0600) to print again."""
    from django.contrib.auth import get_user_model

    from sessions.models import Membership, Role, Team

    User = get_user_model()
    password_file = data_dir / "initial_admin_password"
    username = "admin"
    user = User.objects.filter(username=username).first()
    if user is None:
        password = secrets.token_urlsafe(12)
        user = User.objects.create_superuser(username, "admin@localhost", password)
        password_file.write_text(password)
        password_file.chmod(0o600)
    elif password_file.exists() and user.check_password(password_file.read_text().strip()):
        password = password_file.read_text().strip()
    else:
        password = "(changed since first start)"
    team, _ = Team.objects.get_or_create(slug="default", defaults={"name": "Default"})
    Membership.objects.get_or_create(team=team, user=user, defaults={"role": Role.OWNER})
    return username, password


DEMO_PROVIDER, DEMO_MODEL = "scripted", "scripted/demo"


def start_demo_model():
    """The scripted demo model (deputies/demo/script.json) on a free loopback port, in this process."""
    from sessions.agent.fake_llm import start_in_thread

    return start_in_thread(json.loads((DEMO_DIR / "script.json").read_text()))


def start_demo(env: dict[str, str], data_dir: Path, username: str):
    """Start the scripted demo model in-process and register the bundled sample repository."""
    from sessions.models import Repository, Team
    from sessions.repository_urls import RepositoryRefused, check_repository_url

    fake = start_demo_model()
    env["DEPUTIES_LLM_PROVIDERS"] = DEMO_PROVIDER
    env["DEPUTIES_LLM_SCRIPTED_BASE_URL"] = fake.base_url
    env["DEPUTIES_DEFAULT_MODEL"] = DEMO_MODEL
    repo_path = ensure_sample_repo(data_dir / "sample-repo")
    try:
        url = check_repository_url(str(repo_path)).url
    except RepositoryRefused as exc:  # local repositories switched off, or roots without it
        print(f"deputies: the sample repository is not registered: {exc}", flush=True)
        return fake, repo_path
    team = Team.objects.get(slug="default")
    Repository.objects.get_or_create(
        team=team,
        name="sample-repo",
        defaults={"url": url, "provider": "local", "default_branch": "main"},
    )
    return fake, repo_path


def ensure_sample_repo(path: Path) -> Path:
    import shutil

    from sessions.runner import git

    if (path / ".git").exists():
        return path
    shutil.copytree(DEMO_DIR / "sample_repo", path, dirs_exist_ok=True)
    git("init", "--quiet", "-b", "main", cwd=path)
    git("add", "-A", cwd=path)
    git("commit", "--quiet", "-m", "Sample project with a failing test", cwd=path)
    return path


# --- web / worker ------------------------------------------------------------------------------


def cmd_web(args: argparse.Namespace) -> int:
    # daphne serves plain HTTP here (TLS ends at the proxy; Simple mode is loopback). Twisted loads
    # pyOpenSSL and cryptography's x509 only to offer TLS transports (~5 MB); with pyOpenSSL marked
    # missing it leaves them out, and nothing else in this process uses it (urllib3 and botocore
    # use the standard ssl module).
    sys.modules.setdefault("OpenSSL", None)
    setup_django()
    from daphne.cli import CommandLineInterface

    lighter_daphne()
    settle_heap()
    CommandLineInterface().run(["-b", args.host, "-p", str(args.port), "deputies.asgi:application"])
    return 0


def lighter_daphne() -> None:
    """Two things Twisted does per request under daphne that nobody reads:

    - it parses every POST body with a Content-Type into ``request.args`` (the type through the
      email package's header parser, ~0.5 ms here; a multipart body into a second copy) before
      daphne hands the raw body to Django; Twisted's own switch turns that off;
    - it formats an access-log line of its own for Twisted's log, which daphne (at the verbosity
      ``deputies web`` runs it with) sends nowhere; daphne writes its own access log line as before.
    """
    import inspect

    from daphne import http_protocol, server
    from twisted.python import log
    from twisted.web.http import Request

    if "parsePOSTFormSubmission" in inspect.signature(Request.__init__).parameters:

        class WebRequest(http_protocol.WebRequest):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

        http_protocol.WebRequest = WebRequest  # what daphne's HTTPFactory.buildProtocol looks up

    class HTTPFactory(http_protocol.HTTPFactory):
        def startFactory(self) -> None:
            super().startFactory()
            if self.server.verbosity <= 1 and getattr(self, "_logFile", None) is log.logfile:
                self._logFile = None  # HTTPFactory.log writes nothing then

    server.HTTPFactory = HTTPFactory  # what daphne's Server.run instantiates


def settle_heap() -> None:
    """Less garbage-collector work per request in the web process (~3% of a session POST's
    instructions here): the application is loaded first (daphne then finds it imported) and its
    objects frozen out of every future collection, and the young generation is collected every
    10,000 new objects instead of 700, so most of a request's objects are freed by their reference
    counts before a collection walks them. Cycles are still collected, a few requests later."""
    import gc

    import deputies.asgi  # noqa: F401

    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker process (deputies/worker.py), or DEPUTIES_WORKERS of them under a light supervisor.

    Each process runs up to DEPUTIES_RUNS_PER_WORKER runs at once, so one is plenty for most hosts;
    more only help when the runs' own CPU work (not the waiting) needs more than one core.
    """
    from django.core.exceptions import ImproperlyConfigured

    from deputies.env import envint

    try:
        count = 1 if args.one else envint("DEPUTIES_WORKERS", 1, minimum=1)
    except ImproperlyConfigured as exc:
        raise CLIError(f"configuration error: {exc}") from None
    if count == 1:
        setup_django()
        from deputies.worker import main as worker_main

        return worker_main()
    # The supervisor stays small: no Django here, only the children load it.
    children = [
        subprocess.Popen([sys.executable, "-m", "deputies.cli", "worker", "--one"]) for _ in range(count)
    ]
    return supervise(children)


# --- run -----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    if args.server:  # an API client of a running Deputies: no database here
        from deputies.client import ClientError, run_remote

        try:
            return run_remote(args, describe)
        except ClientError as exc:
            raise CLIError(str(exc)) from None
    setup_django()
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from sessions.models import Membership, Repository, Source, start_session
    from sessions.repository_urls import RepositoryRefused, check_repository_url

    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        from django.core.management import call_command

        call_command("migrate", interactive=False, verbosity=0)  # Simple mode works without `up`
    prompt = args.prompt.strip()
    if not prompt:
        raise CLIError("the prompt is empty")
    try:  # the rules of every other way in (sessions/repository_urls.py), relative to this shell
        url = check_repository_url(str(Path(args.repo).expanduser().absolute())).url
    except RepositoryRefused as exc:
        raise CLIError(f"--repo {args.repo}: {exc}") from None
    repo_path = Path(url)
    model = args.model or settings.DEFAULT_MODEL
    if model and "/" not in model:
        raise CLIError(f"--model {model}: expected provider/model, e.g. openai/gpt-4o or {DEMO_MODEL}")
    demo = None
    if not settings.LLM_PROVIDERS and model in ("", DEMO_MODEL):
        # Like `up`: with no LLM configured, the labelled scripted demo model, served by this
        # process, so the command works from any shell with no variables set.
        demo = start_demo_model()
        settings.LLM_PROVIDERS[DEMO_PROVIDER] = {"kind": "openai", "base_url": demo.base_url, "api_key": ""}
        model = DEMO_MODEL
    if not model:
        raise CLIError("no model: pass --model provider/model or set DEPUTIES_DEFAULT_MODEL")
    provider = model.split("/", 1)[0]
    if provider not in settings.LLM_PROVIDERS:
        configured = ", ".join(sorted(settings.LLM_PROVIDERS)) or "none"
        raise CLIError(f"--model {model}: provider {provider!r} is not configured (configured: {configured})")
    if demo is not None:
        print(f"model {model}: the SCRIPTED DEMO MODEL (not a real LLM; no LLM provider is configured)")
    else:
        print(f"model {model} at {settings.LLM_PROVIDERS[provider]['base_url']}", flush=True)
    user = get_user_model().objects.filter(username=args.user).first()
    if user is None:
        raise CLIError(f"--user {args.user}: no such user (run `deputies up` once to create 'admin')")
    membership = Membership.objects.filter(user=user).select_related("team").order_by("pk").first()
    if membership is None:
        raise CLIError(f"user {args.user!r} belongs to no team")
    branch = args.base_branch or _current_branch(repo_path)
    repository = Repository.objects.filter(team=membership.team, url=str(repo_path)).first()
    if repository is None:
        repository = Repository.objects.create(
            team=membership.team,
            name=_unique_repo_name(membership.team, repo_path.name),
            url=str(repo_path),
            provider="local",
            default_branch=branch,
        )
    session = start_session(
        team=membership.team,
        repository=repository,
        prompt=prompt,
        model=model,
        created_by=user,
        base_branch=branch,
        source=Source.CLI,
    )
    print(f"session {session.pk}: {session.title}", flush=True)
    if not args.queue_only:
        from sessions.runner import execute

        run = session.runs.get()
        threading.Thread(target=_execute_in_thread, args=(execute, run.pk), daemon=True).start()
    return tail(session.pk)


def _execute_in_thread(execute, run_id: int) -> None:
    from django.db import connection

    try:
        execute(run_id)
    finally:
        connection.close()


def _current_branch(path: Path) -> str:
    from sessions.runner import git

    branch = git("rev-parse", "--abbrev-ref", "HEAD", cwd=path).strip()
    return "main" if branch == "HEAD" else branch


def _unique_repo_name(team, base: str) -> str:
    from sessions.models import Repository

    name, n = base, 1
    while Repository.objects.filter(team=team, name=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def tail(session_id: int) -> int:
    """Print events as they land with a live status line; exit 0 only when the session completed."""
    from sessions.models import Event, Session

    after = 0
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    try:
        while True:
            events = list(Event.objects.filter(session_id=session_id, seq__gt=after).order_by("seq")[:500])
            for event in events:
                after = event.seq
                line = describe(event.type, event.payload)
                if line:
                    print(("\r\033[K" if interactive else "") + line, flush=True)
            session = Session.objects.get(pk=session_id)
            if interactive:
                sys.stdout.write(
                    f"\r\033[K[{session.status}] {time.monotonic() - started:5.1f}s  "
                    f"tokens {session.input_tokens}+{session.output_tokens}  ${session.cost_usd:.4f}"
                )
                sys.stdout.flush()
            if session.status in TERMINAL and not events:
                break
            if not events:
                time.sleep(0.2)
    except KeyboardInterrupt:
        Session.objects.get(pk=session_id).cancel()
        print("\ncancelled", flush=True)
        return 130
    if interactive:
        print()
    print(
        f"session {session_id} {session.status}: {session.summary or session.error}".rstrip(": "), flush=True
    )
    return 0 if session.status == "completed" else 1


def describe(type: str, p: dict) -> str:
    if type == "tool_started":
        args = json.dumps(p.get("arguments"), ensure_ascii=False)
        return f"  -> {p.get('name')} {args[:160]}"
    if type == "tool_finished":
        first = (p.get("output") or "").strip().splitlines()
        return (
            f"  <- {p.get('name')} {'ok' if p.get('ok') else 'error'}: {(first[-1] if first else '')[:160]}"
        )
    if type == "assistant_text":
        return f"agent: {p.get('text', '').strip()}"
    if type == "progress":
        return f"progress: {p.get('message')}"
    if type == "todo":
        return "todo: " + "; ".join(f"[{t.get('status')}] {t.get('content')}" for t in p.get("todos", []))
    if type == "sandbox_ready":
        note = "" if p.get("isolated") else f" (NOT ISOLATED: {p.get('reason')})"
        if p.get("secrets_withheld"):
            note += f"; secrets withheld: {', '.join(p['secrets_withheld'])}"
        return f"sandbox ready: {p.get('provider')}{note}"
    if type == "repository_ready":
        return f"repository ready: {p.get('base_branch')} @ {str(p.get('commit'))[:10]} -> {p.get('branch')}"
    if type == "setup_output":
        return "setup: " + p.get("text", "").rstrip()
    if type == "setup_finished":
        return f"setup finished: exit code {p.get('exit_code')} in {p.get('duration')}s"
    if type == "artifact_created":
        return f"artifact: {p.get('kind')} {p.get('name')} ({p.get('size')} bytes)"
    if type in ("run_failed", "llm_error"):
        return f"error: {p.get('error')}"
    if type == "run_completed":
        return "run completed"
    return ""


# --- fake-llm, token ---------------------------------------------------------------------------


def cmd_fake_llm(args: argparse.Namespace) -> int:
    from sessions.agent.fake_llm import main as fake_main

    argv = ["--script", args.script, "--port", str(args.port), "--host", args.host]
    return fake_main(argv)


def cmd_slack(args: argparse.Namespace) -> int:
    """``deputies slack``: Socket Mode in the foreground; ``deputies slack manifest``: the app manifest."""
    setup_django()
    from django.conf import settings

    if args.action == "manifest":
        from integrations.slack.manifest import build

        socket_mode = {"auto": bool(settings.SLACK_APP_TOKEN), "on": True, "off": False}[args.socket_mode]
        manifest = build(settings.BASE_URL, socket_mode, command=settings.SLACK_COMMAND, name=args.name)
        print(json.dumps(manifest, indent=2))
        return 0

    from integrations.slack.socket_mode import serve

    if not settings.SLACK_APP_TOKEN:
        raise CLIError(
            "DEPUTIES_SLACK_APP_TOKEN is not set: Socket Mode needs the app-level token (xapp-...)"
        )
    if not settings.SLACK_BOT_TOKEN:
        raise CLIError("DEPUTIES_SLACK_BOT_TOKEN is not set: replies need the bot token (xoxb-...)")
    from deputies.stopping import set_on_signals

    stop = threading.Event()
    set_on_signals(stop)
    return serve(stop)


def cmd_token(args: argparse.Namespace) -> int:
    setup_django()
    from django.core.management import CommandError, call_command

    try:
        call_command("create_token", args.user, name=args.name)
    except CommandError as exc:
        raise CLIError(str(exc)) from None
    return 0


def cmd_secrets_reencrypt(args: argparse.Namespace) -> int:  # noqa: ARG001
    setup_django()
    from django.core.management import CommandError, call_command

    try:
        call_command("reencrypt_secrets")
    except CommandError as exc:
        raise CLIError(str(exc)) from None
    return 0


def cmd_github_manifest(args: argparse.Namespace) -> int:
    setup_django()
    import json

    from integrations.github.manifest import manifest

    print(json.dumps(manifest(args.name), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deputies", description="Control plane for background coding agents"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        # Every option's default is shown by --help.
        return sub.add_parser(
            name,
            help=help,
            description=help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            **kwargs,
        )

    up = command("up", "Simple mode: migrate, make an admin, run web and worker together")
    up.add_argument(
        "--host",
        default=os.environ.get("DEPUTIES_HOST", "127.0.0.1"),
        help="address to listen on (env DEPUTIES_HOST); loopback only by default, 0.0.0.0 for every interface",
    )
    up.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("DEPUTIES_PORT", "8000")),
        help="port (env DEPUTIES_PORT)",
    )
    up.set_defaults(func=cmd_up)

    web = command("web", "HTTP and websocket server (daphne), for Scale mode behind a proxy")
    web.add_argument("--host", default="0.0.0.0", help="address to listen on: every interface by default")
    web.add_argument("--port", type=int, default=8000, help="port")
    web.set_defaults(func=cmd_web)

    worker = command("worker", "queue worker: many runs at once per process")
    worker.add_argument("--one", action="store_true", help="one process, whatever DEPUTIES_WORKERS says")
    worker.set_defaults(func=cmd_worker)

    run = command("run", "submit a prompt on a local repository and follow it")
    run.add_argument(
        "--repo",
        required=True,
        help="path to a local git repository (with --server: its path or URL on the server)",
    )
    run.add_argument(
        "--model",
        default="",
        help="provider/model (default: DEPUTIES_DEFAULT_MODEL, else the scripted demo model when no LLM is configured)",
    )
    run.add_argument("--base-branch", default="", help="branch to start from (default: the checked-out one)")
    run.add_argument("--user", default="admin", help="the Deputies user the session belongs to")
    run.add_argument("--queue-only", action="store_true", help="leave the run to the workers, just follow it")
    run.add_argument(
        "--server",
        default=os.environ.get("DEPUTIES_SERVER", ""),
        help="URL of a running Deputies: start the session through its API and follow it over its "
        "websocket (default: DEPUTIES_SERVER; without it, run in this process on the local database)",
    )
    run.add_argument(
        "--token",
        default=os.environ.get("DEPUTIES_TOKEN", ""),
        help="API token for --server (default: DEPUTIES_TOKEN; prefer the variable: arguments show in ps)",
    )
    run.add_argument("prompt", help="what the agent should do")
    run.set_defaults(func=cmd_run)

    fake = command("fake-llm", "serve a SCRIPTED OpenAI-compatible model (tests, demos; not a real LLM)")
    fake.add_argument("--script", required=True, metavar="FILE", help="JSON script of responses to replay")
    fake.add_argument("--port", type=int, default=8099, help="port; 0 picks a free one")
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on")
    fake.set_defaults(func=cmd_fake_llm)

    slack = command("slack", "Slack: run Socket Mode in the foreground, or print the app manifest")
    slack.add_argument("action", nargs="?", choices=["run", "manifest"], default="run", help="what to do")
    slack.add_argument(
        "--socket-mode",
        choices=["auto", "on", "off"],
        default="auto",
        help="manifest: Socket Mode (no public URL) or HTTP request URLs under DEPUTIES_BASE_URL; auto: on when DEPUTIES_SLACK_APP_TOKEN is set",
    )
    slack.add_argument("--name", default="Deputies", help="manifest: the app's and the bot's name")
    slack.set_defaults(func=cmd_slack)

    secrets = sub.add_parser("secrets", help="environment secrets")
    secrets_sub = secrets.add_subparsers(dest="secrets_command", required=True)
    reencrypt = secrets_sub.add_parser(
        "reencrypt", help="re-encrypt every secret with the first DEPUTIES_SECRETS_KEY key (rotation)"
    )
    reencrypt.set_defaults(func=cmd_secrets_reencrypt)

    github = sub.add_parser("github", help="the GitHub App")
    github_sub = github.add_subparsers(dest="github_command", required=True)
    github_manifest = github_sub.add_parser(
        "manifest",
        help="print the GitHub App manifest (permissions, events, webhook URL from DEPUTIES_BASE_URL)",
        description="Print the GitHub App manifest (permissions, events, webhook URL from DEPUTIES_BASE_URL).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    github_manifest.add_argument("--name", default="Deputies", help="the app's name on GitHub")
    github_manifest.set_defaults(func=cmd_github_manifest)

    token = sub.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser(
        "create",
        help="create a bearer token for USER and print it once",
        description="Create a bearer token for USER and print it once (only its hash is stored).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    create.add_argument("user", help="username the token acts as")
    create.add_argument("--name", default="", help="a label to recognise the token by in the admin")
    create.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as exc:
        print(f"deputies: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""One settings module for every mode. Each value has a safe Simple-mode default."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from deputies.env import (
    envbool,
    envchoice,
    envfloat,
    envint,
    envjson,
    envnetworks,
    envpaths,
    envrate,
    envstr,
)

# httpx imports its command-line client with the package: click, pygments' lexer table and, where
# installed, rich (~4 MB per process). No process of ours runs that client, so its module is marked
# missing before anything imports httpx (deputies/netguard.py, through the settings below), and
# httpx.main is httpx's own stub that explains how to install it.
sys.modules.setdefault("httpx._main", None)

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(envstr("DEPUTIES_DATA_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = envbool("DEPUTIES_DEBUG", False)
SECRET_KEY = envstr("DEPUTIES_SECRET_KEY", "")
if not SECRET_KEY:
    # Simple mode: a per-installation key kept next to the data, never a shared default.
    key_file = DATA_DIR / "secret_key"
    if key_file.exists():
        SECRET_KEY = key_file.read_text().strip()
    else:
        import secrets

        DATA_DIR.mkdir(parents=True, exist_ok=True)
        SECRET_KEY = secrets.token_urlsafe(50)
        key_file.write_text(SECRET_KEY)
        key_file.chmod(0o600)

# Environment secrets are encrypted with these keys (any strings; comma-separated, the first encrypts,
# all decrypt, so a key can be rotated with `deputies secrets reencrypt`). Every web and worker process
# must share them; Simple mode keeps one next to the data.
_secrets_keys = envstr("DEPUTIES_SECRETS_KEY", "")
if not _secrets_keys:
    key_file = DATA_DIR / "secrets_key"
    if not key_file.exists():
        import secrets
        import tempfile

        # Written aside and linked into place: processes starting together all end up with one key.
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=DATA_DIR, prefix=".secrets_key.")  # mode 0600
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
        try:
            os.link(tmp, key_file)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    _secrets_keys = key_file.read_text().strip()
SECRETS_KEYS = [k.strip() for k in _secrets_keys.split(",") if k.strip()]

ALLOWED_HOSTS = [h.strip() for h in envstr("DEPUTIES_ALLOWED_HOSTS", "*").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in envstr("DEPUTIES_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]
BASE_URL = envstr("DEPUTIES_BASE_URL", "http://127.0.0.1:8000")

# --- HTTPS ------------------------------------------------------------------------------------
# Simple mode is plain http on 127.0.0.1, where secure-only cookies would never be sent back, so none of
# this is on by default. DEPUTIES_HTTPS=true says the site is served only over HTTPS (a production
# deployment, usually behind a TLS-terminating proxy) and turns each of these on; each can be set alone.
# `manage.py check --deploy` is clean with the settings deploy/README.md lists (tests/test_deploy_settings.py).
HTTPS = envbool("DEPUTIES_HTTPS", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = envbool("DEPUTIES_SECURE_COOKIES", HTTPS)
SECURE_SSL_REDIRECT = envbool("DEPUTIES_SSL_REDIRECT", HTTPS)
# Probes (the image's HEALTHCHECK, a load balancer) ask over plain http inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
# An hour to start with, as Django's docs advise; raise it (31536000, a year) once HTTPS is settled.
SECURE_HSTS_SECONDS = envint("DEPUTIES_HSTS_SECONDS", 3600 if HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("DEPUTIES_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = envbool("DEPUTIES_HSTS_PRELOAD", False)
# Asking browsers to preload the domain is a decision for its owner, not a default to nag about.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
# Behind a proxy that terminates TLS and sets X-Forwarded-Proto (and strips one sent by the client):
# without this, every request looks like http, and the redirect above would loop.
if envbool("DEPUTIES_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    # daphne's app only makes `manage.py runserver` serve ASGI (websockets). It loads Twisted, ~15 MB
    # in every process, which workers do not need and `deputies web` (daphne's own CLI) loads itself.
    *(["daphne"] if "runserver" in sys.argv else []),
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets, served from /static/ (offline)
    "django_q",
    "channels",
    "sessions.apps.AgentSessionsConfig",
    "sandboxes.apps.SandboxesConfig",
    "integrations.webhooks.apps.WebhooksConfig",
    "integrations.deliveries.apps.DeliveriesConfig",
    "integrations.slack.apps.SlackConfig",
    "integrations.github.apps.GithubConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# /metrics (deputies/metrics.py): a bearer token for Prometheus (else only staff logins may read it),
# and django-prometheus's per-process request metrics, off by default: see deputies/metrics.py.
METRICS_TOKEN = envstr("DEPUTIES_METRICS_TOKEN", "")
METRICS_MIDDLEWARE = envbool("DEPUTIES_METRICS_MIDDLEWARE", False)
if METRICS_MIDDLEWARE:
    INSTALLED_APPS.append("django_prometheus")
    MIDDLEWARE = [
        "django_prometheus.middleware.PrometheusBeforeMiddleware",
        *MIDDLEWARE,
        "django_prometheus.middleware.PrometheusAfterMiddleware",
    ]

ROOT_URLCONF = "deputies.urls"
ASGI_APPLICATION = "deputies.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASE_URL = envstr("DATABASE_URL", f"sqlite:///{DATA_DIR / 'deputies.sqlite3'}")
_DATABASE_FORMS = "sqlite:///path/to/file.sqlite3 or postgres://user@host:5432/name"
_scheme = DATABASE_URL.partition("://")[0].lower() if "://" in DATABASE_URL else ""
if _scheme not in ("sqlite", "postgres", "postgresql", "pgsql"):
    # Only the scheme is shown: the URL may hold a password.
    raise ImproperlyConfigured(
        f"DATABASE_URL must look like {_DATABASE_FORMS}"
        + (f" (its scheme is {_scheme!r})" if _scheme else "")
    )
try:
    _db = dj_database_url.parse(DATABASE_URL, conn_max_age=envint("DEPUTIES_DB_CONN_MAX_AGE", 60, minimum=0))
except Exception as exc:  # dj_database_url raises several types for a bad URL
    raise ImproperlyConfigured(
        f"DATABASE_URL is not a valid database URL ({_DATABASE_FORMS}): {exc}"
    ) from None
if _db["ENGINE"] == "django.db.backends.sqlite3":
    Path(_db["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    _db["CONN_MAX_AGE"] = 0
    _db["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    _db["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
elif _db["ENGINE"] == "django.db.backends.postgresql":
    _db["CONN_HEALTH_CHECKS"] = True
    # Django's psycopg pool, per process: a worker's run threads hold a connection only while they
    # talk to the database (sessions/workpool.py), so dozens of runs share a few. 0 turns it off
    # (e.g. behind PgBouncer in transaction mode), and connections are kept per thread instead.
    import importlib.util

    _have_pool = importlib.util.find_spec("psycopg_pool") is not None  # psycopg[pool]
    DB_POOL_SIZE = envint("DEPUTIES_DB_POOL_SIZE", 10 if _have_pool else 0, minimum=0)
    if DB_POOL_SIZE and not _have_pool:
        raise ImproperlyConfigured("DEPUTIES_DB_POOL_SIZE needs psycopg_pool: pip install 'psycopg[pool]'")
    if DB_POOL_SIZE:
        _db["CONN_MAX_AGE"] = 0  # closing a connection gives it back to the pool
        _db["ENGINE"] = "deputies.postgresql"  # its pool checks a connection without a round trip
        _db.setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": DB_POOL_SIZE,
            "timeout": envfloat("DEPUTIES_DB_POOL_TIMEOUT", 60.0, minimum=1),
            "max_idle": 300,
        }
        from sessions.workpool import forget_inherited_pools

        os.register_at_fork(after_in_child=forget_inherited_pools)  # django-q2 forks its workers
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Simple mode is the single-host trial: SQLite. Integrated and Scale mode run on Postgres.
SIMPLE_MODE = _db["ENGINE"] == "django.db.backends.sqlite3"

# --- Repositories ---------------------------------------------------------------------------
# Paths on the worker host as repositories (sessions/repository_urls.py): only in Simple mode unless
# switched on, only under these roots (resolved; Deputies' own data below them never counts).
ALLOW_LOCAL_REPOSITORIES = envbool("DEPUTIES_ALLOW_LOCAL_REPOSITORIES", SIMPLE_MODE)
LOCAL_REPOSITORY_ROOTS = envpaths(
    "DEPUTIES_LOCAL_REPOSITORY_ROOTS", f"{DATA_DIR / 'sample-repo'},{DATA_DIR / 'repositories'}"
)

# --- Auth, i18n, static, media ------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "session-list"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
MEDIA_ROOT = DATA_DIR / "media"
SERVE_STATIC = envbool("DEPUTIES_SERVE_STATIC", True)

S3_BUCKET = envstr("DEPUTIES_S3_BUCKET")
S3_URL_TTL = envint("DEPUTIES_S3_URL_TTL", 300, minimum=1)  # seconds a presigned download URL works
if S3_URL_TTL > 604800:
    raise ImproperlyConfigured(f"DEPUTIES_S3_URL_TTL='{S3_URL_TTL}' must be at most 604800 (SigV4's 7 days)")
if S3_BUCKET:
    _default_storage = {
        "BACKEND": "sessions.s3.ArtifactS3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "location": envstr("DEPUTIES_S3_PREFIX").strip("/"),
            "endpoint_url": envstr("DEPUTIES_S3_ENDPOINT_URL") or None,
            "public_endpoint_url": envstr("DEPUTIES_S3_PUBLIC_ENDPOINT_URL") or None,
            "region_name": envstr("DEPUTIES_S3_REGION") or None,
            "access_key": envstr("DEPUTIES_S3_ACCESS_KEY_ID") or None,
            "secret_key": envstr("DEPUTIES_S3_SECRET_ACCESS_KEY") or None,
            "default_acl": None,
            "file_overwrite": False,
            "querystring_auth": True,
            "querystring_expire": S3_URL_TTL,
            "signature_version": "s3v4",  # botocore would presign SigV2 for custom endpoints
        },
    }
else:
    _default_storage = {"BACKEND": "django.core.files.storage.FileSystemStorage"}
STORAGES = {
    "default": _default_storage,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# --- API --------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "sessions.api.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "sessions.api.schema.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "sessions.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "sessions.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
# Rate limits per API client (its bearer token, else its user): "600/min" ("N/s", "N/min", "N/h",
# "N/day"), "0" for none. Sessions have their own, stricter one (sessions/api/throttles.py).
API_RATE = envrate("DEPUTIES_API_RATE", "600/min")
API_RATE_SESSIONS = envrate("DEPUTIES_API_RATE_SESSIONS", "60/min")
REST_FRAMEWORK["DEFAULT_THROTTLE_CLASSES"] = ["sessions.api.throttles.APIRateThrottle"]

SPECTACULAR_SETTINGS = {
    "TITLE": "Deputies API",
    "DESCRIPTION": "Control plane for background coding agents.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "SWAGGER_UI_SETTINGS": {"persistAuthorization": True, "deepLinking": True, "displayOperationId": False},
    # Several models have a `status`; these keep the enums' names stable as serializers are added.
    "ENUM_NAME_OVERRIDES": {
        "SessionStatusEnum": "sessions.models.SessionStatus",
        "MessageCreatedStatusEnum": "sessions.models.Message.Status",
        "ScheduledMessageStatusEnum": "sessions.automations.ScheduledMessage.Status",
    },
    # Request bodies get their own components: what a client sends (secrets as {NAME: change}, write-only
    # fields, non-blank strings) differs from what it reads back.
    "COMPONENT_SPLIT_REQUEST": True,
    # Bodies are documented as JSON only: objects such as env_vars and secrets have no form encoding.
    "PARSER_WHITELIST": ["rest_framework.parsers.JSONParser"],
}

# --- Channels -------------------------------------------------------------------------------
REDIS_URL = envstr("DEPUTIES_REDIS_URL")
# Where API rate counters live, shared by every web process: Redis when configured, else the
# database on Postgres; "memory" is per process (Simple mode's single web process on SQLite).
RATE_LIMIT_STORE = envchoice("DEPUTIES_RATE_LIMIT_STORE", "auto", ("auto", "redis", "database", "memory"))
if RATE_LIMIT_STORE == "auto":
    RATE_LIMIT_STORE = (
        "redis" if REDIS_URL else "database" if _db["ENGINE"].endswith("postgresql") else "memory"
    )
if RATE_LIMIT_STORE == "redis" and not REDIS_URL:
    raise ImproperlyConfigured("DEPUTIES_RATE_LIMIT_STORE=redis needs DEPUTIES_REDIS_URL")
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# Websocket pushes (sessions/streaming): how a web process hears that events were written.
# auto = Redis pub/sub when DEPUTIES_REDIS_URL is set, else Postgres LISTEN/NOTIFY, else polling (SQLite).
STREAM_BACKEND = envchoice("DEPUTIES_STREAM_BACKEND", "auto", ("auto", "redis", "postgres", "poll"))
if STREAM_BACKEND == "auto":
    STREAM_BACKEND = "redis" if REDIS_URL else "postgres" if _db["ENGINE"].endswith("postgresql") else "poll"
if STREAM_BACKEND == "redis" and not REDIS_URL:
    raise ImproperlyConfigured("DEPUTIES_STREAM_BACKEND=redis needs DEPUTIES_REDIS_URL")
if STREAM_BACKEND == "postgres" and not _db["ENGINE"].endswith("postgresql"):
    raise ImproperlyConfigured("DEPUTIES_STREAM_BACKEND=postgres needs a Postgres DATABASE_URL")
# Seconds between database checks: the only source with "poll", a safety net for missed notifications.
STREAM_POLL_INTERVAL = envfloat("DEPUTIES_STREAM_POLL", 0.5, minimum=0.05)
STREAM_SAFETY_POLL_INTERVAL = envfloat("DEPUTIES_STREAM_SAFETY_POLL", 5.0, minimum=0.5)
# Under daphne, write each event's frame straight to the subscribers' sockets (sessions/streaming/wire.py).
STREAM_DIRECT_WRITE = envbool("DEPUTIES_STREAM_DIRECT_WRITE", True)
# Postgres: concurrent emit() calls of one process share one insert statement and commit (events.py).
EVENTS_GROUP_COMMIT = envbool("DEPUTIES_EVENTS_GROUP_COMMIT", True)
# emit()'s statement is prepared once per connection (sessions/events.py); turn off behind a pooler
# that does not keep a server connection per client (PgBouncer in transaction mode).
DB_PREPARED_STATEMENTS = envbool("DEPUTIES_DB_PREPARED_STATEMENTS", True)

# --- Queue (django-q2, ORM broker) ----------------------------------------------------------
# A running run whose heartbeat is older than this lost its worker; it is queued again and resumes
# from its last step. Each worker process beats for all its runs every third of it (sessions/
# workpool.py, Heartbeat), however long a step takes, and checks for lost runs every few seconds.
RUN_LEASE_SECONDS = envint("DEPUTIES_RUN_LEASE", 30, minimum=2)
RUN_TIMEOUT = envint("DEPUTIES_RUN_TIMEOUT", 3600, minimum=10)
# Each worker process runs up to this many runs at once, on threads (sessions/workpool.py). SQLite
# serialises writes, so it gets fewer.
RUNS_PER_WORKER = envint(
    "DEPUTIES_RUNS_PER_WORKER", 4 if _db["ENGINE"].endswith("sqlite3") else 48, minimum=1
)
# Seconds a stopping worker process waits for its runs before leaving them to lease recovery.
WORKER_GRACE = envint("DEPUTIES_WORKER_GRACE", 10, minimum=0)
_workers = envint("DEPUTIES_WORKERS", 1, minimum=1)
QUEUE_RETRY = 2 * RUN_LEASE_SECONDS
Q_CLUSTER = {
    "name": "deputies",
    "orm": "default",
    "workers": _workers,
    # qcluster only: a run task returns once its run has started on the pool; it only blocks while
    # the pool is full, and gives up (requeues the run) before this timeout, which would kill the
    # whole process. ``deputies worker`` never kills a task.
    "timeout": QUEUE_RETRY,
    # Recycling (or an RSS limit) ends a worker process, and with it the runs on its threads.
    "recycle": None,
    "max_rss": None,
    # Prefetch little: a task waiting behind a full pool is better taken by another process.
    "queue_limit": _workers,
    # How long a task taken by a lost worker waits to be delivered again. A run task is
    # acknowledged once its run is claimed (the run's lease covers it from there), and `deputies
    # worker` keeps pushing this back for the tasks it is still working on (deputies/worker.py).
    "retry": QUEUE_RETRY,
    "max_attempts": envint("DEPUTIES_TASK_MAX_ATTEMPTS", 2, minimum=1),
    # Workers are woken by LISTEN/NOTIFY on Postgres; the poll is the fallback (and SQLite's pace).
    "broker_class": "deputies.broker.NotifyingORM",
    "poll": envfloat("DEPUTIES_QUEUE_POLL", 0.2 if DATABASE_URL.startswith("sqlite") else 2.0, minimum=0.01),
    "catch_up": False,
    "ack_failures": True,
    # Successful tasks are kept (the admin's Queue pages, /setup), but pruned once a minute by
    # sessions.tasks.recover_stale_runs: django-q2's own pruning (a positive save_limit) reads and
    # locks every saved success on every task it saves, ~14 ms of CPU per run at 1,000 rows.
    "save_limit": 0,
    "label": "Queue",
    "sync": envbool("DEPUTIES_QUEUE_SYNC", False),
}
RUN_SLOT_WAIT = max(1, QUEUE_RETRY - 2)

# --- Sandboxes --------------------------------------------------------------------------------
SANDBOX_PROVIDER = envchoice("DEPUTIES_SANDBOX_PROVIDER", "local", ("local", "docker"))
SANDBOX_ROOT = Path(envstr("DEPUTIES_SANDBOX_ROOT", str(DATA_DIR / "sandboxes"))).resolve()
SANDBOX_ISOLATION = envchoice("DEPUTIES_SANDBOX_ISOLATION", "auto", ("auto", "bwrap", "none"))
SANDBOX_EXEC_TIMEOUT = envint("DEPUTIES_SANDBOX_EXEC_TIMEOUT", 600, minimum=1)
# While a command runs, each worker process checks this often (one query for all its runs) whether
# a run was cancelled, and kills its command (sessions/cancels.py). Nothing is asked while idle.
CANCEL_POLL = envfloat("DEPUTIES_CANCEL_POLL", 0.5, minimum=0.05)
# The repository's .deputies/setup runs once per new sandbox, before the agent, within this limit.
SETUP_TIMEOUT = envint("DEPUTIES_SETUP_TIMEOUT", 600, minimum=1)
# A ready sandbox unused for this long is destroyed by the reaper (an environment may set its own).
SANDBOX_IDLE_TTL = envint("DEPUTIES_SANDBOX_IDLE_TTL", 1800, minimum=60)
# Spending limits in USD (0: none). A session or team may set its own (sessions/budgets.py).
SESSION_BUDGET_USD = envfloat("DEPUTIES_SESSION_BUDGET_USD", 0.0, minimum=0)
TEAM_MONTHLY_BUDGET_USD = envfloat("DEPUTIES_TEAM_MONTHLY_BUDGET_USD", 0.0, minimum=0)
# Runs one team may have running at once (0: no limit); more wait, queued (sessions/limits.py).
# A team may set its own in the admin.
TEAM_MAX_CONCURRENT_RUNS = envint("DEPUTIES_TEAM_MAX_CONCURRENT_RUNS", 0, minimum=0)
# No sandbox lives longer than this, used or not: its next run starts from a fresh one.
SANDBOX_MAX_AGE = envint("DEPUTIES_SANDBOX_MAX_AGE", 86400, minimum=60)
# A run whose worker was lost this many times fails instead of being queued again.
RUN_MAX_RECOVERIES = envint("DEPUTIES_RUN_MAX_RECOVERIES", 3, minimum=0)
# Save the workspace (its diff against the base commit, an artifact) after every Nth agent step that
# ran a tool able to change it, so a run whose sandbox is lost resumes with its work; 0: never.
CHECKPOINT_EVERY = envint("DEPUTIES_CHECKPOINT_EVERY", 1, minimum=0)
# Docker provider: the engine is whatever DEPUTIES_DOCKER_HOST (else DOCKER_HOST) points at, Docker
# Engine or Podman's Docker-compatible API. Limits apply when an environment sets none.
DOCKER_HOST = envstr("DEPUTIES_DOCKER_HOST")
DOCKER_IMAGE = envstr("DEPUTIES_DOCKER_IMAGE", "python:3.12-slim")
# Labels every container and volume, so several deployments can share one engine and the reaper
# only ever touches its own.
DOCKER_DEPLOYMENT = envstr("DEPUTIES_DOCKER_DEPLOYMENT", "default")
DOCKER_USER = envstr("DEPUTIES_DOCKER_USER", "1000:1000")
if not re.fullmatch(r"[1-9][0-9]*:[0-9]+", DOCKER_USER):
    raise ImproperlyConfigured(f"DEPUTIES_DOCKER_USER={DOCKER_USER!r} must be a non-root numeric uid:gid")
DOCKER_CPUS = envfloat("DEPUTIES_DOCKER_CPUS", 2.0, minimum=0.01)
DOCKER_MEMORY_MB = envint("DEPUTIES_DOCKER_MEMORY_MB", 4096, minimum=64)
DOCKER_PIDS_LIMIT = envint("DEPUTIES_DOCKER_PIDS_LIMIT", 512, minimum=16)
DOCKER_TMP_MB = envint("DEPUTIES_DOCKER_TMP_MB", 512, minimum=1)
DOCKER_API_TIMEOUT = envint("DEPUTIES_DOCKER_API_TIMEOUT", 120, minimum=5)


# --- Agent and models -------------------------------------------------------------------------
def _llm_providers() -> dict[str, dict[str, str]]:
    """Providers from DEPUTIES_LLM_<NAME>_{BASE_URL,API_KEY,KIND}.

    ``openai`` and ``anthropic`` are looked for by default; more names (a vLLM box, a LiteLLM proxy,
    the scripted demo) are listed in DEPUTIES_LLM_PROVIDERS.
    """
    names = {"openai", "anthropic"}
    names.update(n.strip().lower() for n in envstr("DEPUTIES_LLM_PROVIDERS").split(",") if n.strip())
    defaults = {
        "openai": ("openai", "https://api.openai.com/v1"),
        "anthropic": ("anthropic", "https://api.anthropic.com"),
    }
    providers: dict[str, dict[str, str]] = {}
    for name in sorted(names):
        prefix = f"DEPUTIES_LLM_{name.upper().replace('-', '_')}"
        kind_default, url_default = defaults.get(name, ("openai", ""))
        api_key = envstr(f"{prefix}_API_KEY")
        base_url = envstr(f"{prefix}_BASE_URL", url_default)
        if name in defaults and not api_key and base_url == url_default:
            continue  # a well-known provider with nothing configured
        if not base_url:
            raise ImproperlyConfigured(f"{prefix}_BASE_URL must be set for the LLM provider {name!r}")
        providers[name] = {
            "kind": envchoice(f"{prefix}_KIND", kind_default, ("openai", "anthropic")),
            "base_url": base_url.rstrip("/"),
            "api_key": api_key,
        }
    return providers


LLM_PROVIDERS = _llm_providers()
DEFAULT_MODEL = envstr("DEPUTIES_DEFAULT_MODEL", "")
if DEFAULT_MODEL and "/" not in DEFAULT_MODEL:
    raise ImproperlyConfigured(f"DEPUTIES_DEFAULT_MODEL={DEFAULT_MODEL!r} must look like provider/model")
# A cheaper model for housekeeping: it names a session after its first run (sessions/agent/titles.py).
# Empty: sessions keep their prompt's first line as their title.
SUMMARY_MODEL = envstr("DEPUTIES_SUMMARY_MODEL", "")
if SUMMARY_MODEL and "/" not in SUMMARY_MODEL:
    raise ImproperlyConfigured(f"DEPUTIES_SUMMARY_MODEL={SUMMARY_MODEL!r} must look like provider/model")
LLM_MAX_TOKENS = envint("DEPUTIES_LLM_MAX_TOKENS", 4096, minimum=1)
LLM_TIMEOUT = envfloat("DEPUTIES_LLM_TIMEOUT", 120.0, minimum=1)
LLM_MAX_RETRIES = envint("DEPUTIES_LLM_MAX_RETRIES", 4, minimum=0)
LLM_RETRY_BASE_DELAY = envfloat("DEPUTIES_LLM_RETRY_BASE_DELAY", 1.0, minimum=0)
# USD per million tokens; keys are "provider/model" or bare model names.
LLM_PRICES = envjson(
    "DEPUTIES_LLM_PRICES",
    {
        "gpt-4o": {"input": 2.5, "output": 10.0, "cached": 1.25},
        "gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached": 0.075},
        "gpt-4.1": {"input": 2.0, "output": 8.0, "cached": 0.5},
        "claude-sonnet-4-5": {"input": 3.0, "output": 15.0, "cached": 0.3},
        "claude-haiku-4-5": {"input": 1.0, "output": 5.0, "cached": 0.1},
    },
)
if not isinstance(LLM_PRICES, dict):
    raise ImproperlyConfigured("DEPUTIES_LLM_PRICES must be a JSON object of model -> prices")
AGENT_MAX_STEPS = envint("DEPUTIES_AGENT_MAX_STEPS", 50, minimum=1)
TOOL_OUTPUT_LIMIT = envint("DEPUTIES_TOOL_OUTPUT_LIMIT", 16000, minimum=256)
# Characters of conversation sent to the model (~4 per token); older tool output is elided past it.
CONTEXT_CHARS = envint("DEPUTIES_CONTEXT_CHARS", 400_000, minimum=10_000)
MAX_PROMPT_CHARS = envint("DEPUTIES_MAX_PROMPT_CHARS", 100_000, minimum=1)
# Child sessions (sessions/children.py): how deep they may nest (0: agents cannot spawn any) and how
# many one session may spawn in all; a child's spend counts against its parent's budget.
CHILD_MAX_DEPTH = envint("DEPUTIES_CHILD_MAX_DEPTH", 2, minimum=0)
CHILD_MAX_PER_SESSION = envint("DEPUTIES_CHILD_MAX_PER_SESSION", 5, minimum=1)
# Longest a wait_sessions call may wait (seconds); the model may ask for less.
CHILD_WAIT_TIMEOUT = envint("DEPUTIES_CHILD_WAIT_TIMEOUT", 3600, minimum=1)
# Largest request body (bytes) Django reads; a larger one is a 413 (sessions/api/errors.py). The default
# admits the longest allowed prompt however it is encoded: one character is at most 12 bytes on the wire
# (a JSON-escaped surrogate pair "\ud83d\ude00", or "%F0%9F%98%80" in a form), plus room for the rest.
DATA_UPLOAD_MAX_MEMORY_SIZE = envint(
    "DEPUTIES_MAX_REQUEST_BYTES", max(2_621_440, 12 * MAX_PROMPT_CHARS + 65_536), minimum=65_536
)

# Ranges that user-given addresses may reach although the default rules refuse them (loopback,
# link-local, private, ...): deputies/netguard.py. Empty: only public addresses.
CALLBACK_ALLOWED_NETWORKS = envnetworks("DEPUTIES_CALLBACK_ALLOWED_NETWORKS")
# false: user-given host names are looked up in /etc/hosts only, never in DNS (IP addresses work).
RESOLVE_NAMES = envbool("DEPUTIES_RESOLVE_NAMES", True)
REPOSITORY_ALLOWED_NETWORKS = envnetworks("DEPUTIES_REPOSITORY_ALLOWED_NETWORKS")

# --- Agent tools beyond the workspace (sessions/agent/web.py, sessions/agent/mcp.py) -------------
# web_fetch: an http(s) GET by the worker. Addresses follow deputies/netguard.py (public only unless
# a range is allowed here); bodies are cut at MAX_BYTES, a fetch gives up after TIMEOUT seconds.
WEB_FETCH_ENABLED = envbool("DEPUTIES_WEB_FETCH_ENABLED", True)
WEB_FETCH_ALLOWED_NETWORKS = envnetworks("DEPUTIES_WEB_FETCH_ALLOWED_NETWORKS")
WEB_FETCH_MAX_BYTES = envint("DEPUTIES_WEB_FETCH_MAX_BYTES", 2_000_000, minimum=1024)
WEB_FETCH_TIMEOUT = envfloat("DEPUTIES_WEB_FETCH_TIMEOUT", 20.0, minimum=0.1)
# web_search: offered only with a backend. "searxng" is a SearXNG instance's JSON API at the URL.
# "brave" is the Brave Search API (DEPUTIES_WEB_SEARCH_API_KEY; the URL defaults to Brave's).
WEB_SEARCH_URL = envstr("DEPUTIES_WEB_SEARCH_URL", "").rstrip("/")
WEB_SEARCH_BACKEND = envchoice(
    "DEPUTIES_WEB_SEARCH_BACKEND", "searxng" if WEB_SEARCH_URL else "none", ("none", "searxng", "brave")
)
WEB_SEARCH_API_KEY = envstr("DEPUTIES_WEB_SEARCH_API_KEY", "")
if WEB_SEARCH_BACKEND == "brave":
    WEB_SEARCH_URL = WEB_SEARCH_URL or "https://api.search.brave.com/res/v1"
    if not WEB_SEARCH_API_KEY:
        raise ImproperlyConfigured("DEPUTIES_WEB_SEARCH_BACKEND=brave needs DEPUTIES_WEB_SEARCH_API_KEY")
if WEB_SEARCH_BACKEND == "searxng" and not WEB_SEARCH_URL:
    raise ImproperlyConfigured("DEPUTIES_WEB_SEARCH_BACKEND=searxng needs DEPUTIES_WEB_SEARCH_URL")
WEB_SEARCH_RESULTS = envint("DEPUTIES_WEB_SEARCH_RESULTS", 8, minimum=1)
# Remote MCP servers (streamable HTTP) for every team: [{"name", "url", "headers"}]; teams add their
# own in the admin. Header values may name the session environment's secrets as ${NAME}.
MCP_SERVERS = envjson("DEPUTIES_MCP_SERVERS", [])
MCP_ALLOWED_NETWORKS = envnetworks("DEPUTIES_MCP_ALLOWED_NETWORKS")
MCP_TIMEOUT = envfloat("DEPUTIES_MCP_TIMEOUT", 60.0, minimum=0.1)


def _check_mcp_servers(servers: object) -> None:
    import re

    if not isinstance(servers, list):
        raise ImproperlyConfigured("DEPUTIES_MCP_SERVERS must be a JSON list of {name, url, headers}")
    for n, server in enumerate(servers):
        where = f"DEPUTIES_MCP_SERVERS[{n}]"
        if not isinstance(server, dict) or set(server) - {"name", "url", "headers"}:
            raise ImproperlyConfigured(f"{where} must be an object with name, url and optional headers")
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]|_(?!_)){0,39}", str(server.get("name", ""))):
            raise ImproperlyConfigured(f"{where}.name must be lower-case letters, digits, - and _ (no __)")
        if not str(server.get("url", "")).startswith(("http://", "https://")):
            raise ImproperlyConfigured(f"{where}.url must be an http:// or https:// URL")
        headers = server.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ImproperlyConfigured(f"{where}.headers must be an object of strings")


_check_mcp_servers(MCP_SERVERS)

# Inbound webhooks (integrations/webhooks): POST /integrations/webhooks/<source>. Off: every source 404s.
WEBHOOKS_ENABLED = envbool("DEPUTIES_WEBHOOKS_ENABLED", True)

# --- Outbound deliveries (integrations/deliveries): callbacks, later Slack and GitHub replies ------
# Attempts per delivery, and how long after its creation the last one may start.
DELIVERY_MAX_ATTEMPTS = envint("DEPUTIES_DELIVERY_MAX_ATTEMPTS", 8, minimum=1)
DELIVERY_MAX_AGE = envfloat("DEPUTIES_DELIVERY_MAX_AGE", 86400.0, minimum=1)
# Exponential back-off with full jitter: attempt n waits uniform(0, min(MAX, BASE * 2**(n-1))) seconds,
# or what the receiver's Retry-After asks for.
DELIVERY_BACKOFF_BASE = envfloat("DEPUTIES_DELIVERY_BACKOFF_BASE", 5.0, minimum=0.001)
DELIVERY_BACKOFF_MAX = envfloat("DEPUTIES_DELIVERY_BACKOFF_MAX", 3600.0, minimum=0.001)
# Seconds one attempt may take (connect, send, answer).
DELIVERY_TIMEOUT = envfloat("DEPUTIES_DELIVERY_TIMEOUT", 10.0, minimum=0.1)
# An attempt still "sending" after this many seconds lost its worker; recovery sends it again.
DELIVERY_LEASE = envfloat("DEPUTIES_DELIVERY_LEASE", max(60.0, DELIVERY_TIMEOUT * 3), minimum=1)
# Deliveries one worker process sends at once (threads beside its runs).
DELIVERY_CONCURRENCY = envint("DEPUTIES_DELIVERY_CONCURRENCY", 8, minimum=1)

# --- Slack (integrations/slack): off until a bot token and a signing secret (HTTP) or an app token
# (Socket Mode) are set. Each also reads NAME_FILE.
SLACK_BOT_TOKEN = envstr("DEPUTIES_SLACK_BOT_TOKEN")
SLACK_SIGNING_SECRET = envstr("DEPUTIES_SLACK_SIGNING_SECRET")
SLACK_APP_TOKEN = envstr("DEPUTIES_SLACK_APP_TOKEN")
# The Web API's base URL (tests point it at a loopback fake).
SLACK_API_URL = envstr("DEPUTIES_SLACK_API_URL", "https://slack.com/api/")
# Socket Mode inside every `deputies worker` when the app token is set (else only `deputies slack`).
SLACK_SOCKET_MODE_IN_WORKER = envbool("DEPUTIES_SLACK_SOCKET_MODE_IN_WORKER", True)
# The slash command the app registers, and seconds between two edits of a thread's status message.
SLACK_COMMAND = envstr("DEPUTIES_SLACK_COMMAND", "/deputy")
SLACK_STATUS_INTERVAL = envfloat("DEPUTIES_SLACK_STATUS_INTERVAL", 3.0, minimum=0.1)
# Attempts per Slack message (deliveries back off between them, or wait as long as a 429 asks).
SLACK_DELIVERY_MAX_ATTEMPTS = envint("DEPUTIES_SLACK_DELIVERY_MAX_ATTEMPTS", 30, minimum=1)
SLACK_TIMEOUT = envfloat("DEPUTIES_SLACK_TIMEOUT", 10.0, minimum=0.1)

# --- GitHub App (integrations/github): issue and PR comments become sessions and pull requests ---
# The app's id and private key (PEM; DEPUTIES_GITHUB_PRIVATE_KEY_FILE for a mounted file) sign the
# JWT that PyGithub exchanges for installation tokens. Without them, DEPUTIES_GITHUB_TOKEN (a personal
# access token) is a fallback for quick trials, labelled as such on /setup.
GITHUB_APP_ID = envstr("DEPUTIES_GITHUB_APP_ID", "")
GITHUB_PRIVATE_KEY = envstr("DEPUTIES_GITHUB_PRIVATE_KEY", "").replace("\\n", "\n")
GITHUB_TOKEN = envstr("DEPUTIES_GITHUB_TOKEN", "")
GITHUB_WEBHOOK_SECRET = envstr("DEPUTIES_GITHUB_WEBHOOK_SECRET", "")
# The REST API root: GitHub Enterprise Server is https://<host>/api/v3.
GITHUB_API_URL = envstr("DEPUTIES_GITHUB_API_URL", "https://api.github.com").rstrip("/")
# What makes a comment a request, and the label that makes an issue one.
GITHUB_TRIGGER = envstr("DEPUTIES_GITHUB_TRIGGER", "/deputy")
GITHUB_LABEL = envstr("DEPUTIES_GITHUB_LABEL", "deputy")
# Answer a trigger from someone without write access with a polite comment (else: nothing at all).
GITHUB_REPLY_TO_NON_WRITERS = envbool("DEPUTIES_GITHUB_REPLY_TO_NON_WRITERS", False)
# Characters of an issue's body and comment thread given to the agent with the first request.
GITHUB_CONTEXT_CHARS = envint("DEPUTIES_GITHUB_CONTEXT_CHARS", 20_000, minimum=1000)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": envstr("DEPUTIES_LOG_LEVEL", "INFO")},
    # httpx2 is the mcp SDK's client (sessions/agent/mcp.py): one INFO line per request otherwise.
    "loggers": {
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "mcp": {"level": "WARNING"},
        "django_q": {"level": "WARNING"},
    },
}

os.environ.setdefault("GIT_TERMINAL_PROMPT", "0")

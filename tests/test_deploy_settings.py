"""Production settings pass ``manage.py check --deploy``; Simple mode stays usable over plain http.

The settings are read in a child process, from the environment exactly as deploy/README.md lists them.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

from tests.live import ROOT

# What deploy/README.md tells a production deployment to set (besides the database and storage).
PRODUCTION = {
    "DEPUTIES_HTTPS": "true",
    "DEPUTIES_ALLOWED_HOSTS": "deputies.example.com",
    "DEPUTIES_CSRF_TRUSTED_ORIGINS": "https://deputies.example.com",
    "DEPUTIES_BASE_URL": "https://deputies.example.com",
    "DEPUTIES_TRUST_X_FORWARDED_PROTO": "true",
}


def child(tmp_path: Path, argv: list[str], **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPUTIES_", "DJANGO_", "PYTEST_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        DEPUTIES_DATA_DIR=str(tmp_path / "data"),
        DEPUTIES_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_SETTINGS_MODULE="deputies.settings",
        **variables,
    )
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def deploy_check(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    return child(tmp_path, argv, **variables)


def settings_of(tmp_path: Path, **variables: str) -> dict:
    names = [
        "DEBUG",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SECURE_PROXY_SSL_HEADER",
        "CSRF_TRUSTED_ORIGINS",
    ]
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n) for n in {names!r}}}))"
    )
    result = child(tmp_path, [sys.executable, "-c", code], **variables)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_it_passes_the_deploy_check_with_the_documented_production_settings(tmp_path):
    result = deploy_check(tmp_path, **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout + result.stderr


def test_it_fails_the_deploy_check_in_simple_mode_where_nothing_forces_https(tmp_path):
    result = deploy_check(tmp_path)
    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stderr, result.stderr


def test_it_keeps_simple_mode_on_plain_http_and_turns_everything_on_with_https(tmp_path):
    simple = settings_of(tmp_path)
    assert simple["DEBUG"] is False
    assert not simple["SESSION_COOKIE_SECURE"] and not simple["CSRF_COOKIE_SECURE"]
    assert not simple["SECURE_SSL_REDIRECT"] and simple["SECURE_HSTS_SECONDS"] == 0
    assert simple["SECURE_PROXY_SSL_HEADER"] is None
    production = settings_of(tmp_path, **PRODUCTION)
    assert production["SESSION_COOKIE_SECURE"] and production["CSRF_COOKIE_SECURE"]
    assert production["SECURE_SSL_REDIRECT"] and production["SECURE_HSTS_SECONDS"] == 3600
    assert production["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert production["CSRF_TRUSTED_ORIGINS"] == ["https://deputies.example.com"]
    # Each one can still be set on its own.
    tuned = settings_of(
        tmp_path, **PRODUCTION, DEPUTIES_HSTS_SECONDS="31536000", DEPUTIES_SSL_REDIRECT="false"
    )
    assert tuned["SECURE_HSTS_SECONDS"] == 31536000 and not tuned["SECURE_SSL_REDIRECT"]
    assert tuned["SESSION_COOKIE_SECURE"]


@pytest.mark.django_db
def test_it_redirects_plain_http_to_https_except_the_health_probes(settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    client = Client()
    login = client.get("/login")
    assert login.status_code == 301 and login["Location"] == "https://testserver/login"
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)  # answered, not redirected
    behind_proxy = client.get("/login", HTTP_X_FORWARDED_PROTO="https")
    assert behind_proxy.status_code == 200
    assert behind_proxy["Strict-Transport-Security"] == "max-age=3600; includeSubDomains"

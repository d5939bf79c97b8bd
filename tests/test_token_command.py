"""``create_token``: the secret is printed once, works as a bearer token, and mistakes read as one line."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, ManagementUtility, call_command
from rest_framework.test import APIClient

from sessions.models import APIToken


def test_it_prints_a_working_secret_once(owner):
    out, err = StringIO(), StringIO()
    call_command("create_token", "owner", name="ci", stdout=out, stderr=err)
    secret = out.getvalue().strip()
    assert secret.startswith("dep_") and "\n" not in secret  # only the secret on stdout, for $(...)
    token = APIToken.objects.get()
    assert (token.user, token.name, token.key_hash) == (owner, "ci", APIToken.hash(secret))
    assert secret not in token.prefix + token.key_hash  # only a prefix and the hash are stored
    assert "shown only this once" in err.getvalue()
    assert f"Authorization: Bearer {secret}" in err.getvalue()

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert client.get("/api/v1/sessions").status_code == 200


def test_it_names_an_unknown_user(db):
    with pytest.raises(CommandError, match="no user named ghost"):
        call_command("create_token", "ghost", stdout=StringIO(), stderr=StringIO())
    assert not APIToken.objects.exists()


def test_it_reports_an_unknown_user_without_a_traceback(db, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ManagementUtility(["manage.py", "create_token", "ghost"]).execute()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "CommandError: no user named ghost" in err
    assert "Traceback" not in err


def test_it_refuses_an_inactive_user(owner):
    owner.is_active = False
    owner.save()
    with pytest.raises(CommandError, match="inactive"):
        call_command("create_token", "owner", stdout=StringIO(), stderr=StringIO())

"""Bearer tokens: ``Authorization: Bearer <secret>``, looked up by the SHA-256 of the secret."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import Q
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed

from sessions.columns import prepared_cursor
from sessions.models import APIToken

# last_used is for operators ("is this token still in use?"), not an audit log: writing it on every
# request would turn each read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


_token_sql: tuple[str, Any, Any] | None = None


def _token_with_user(key_hash: str) -> APIToken | None:
    """``APIToken.objects.select_related("user").filter(key_hash=...).first()`` as one precompiled
    statement: on every API request, and the ORM spends longer compiling it than Postgres running it."""
    global _token_sql
    if _token_sql is None:
        from django.contrib.auth import get_user_model

        from sessions.columns import Columns

        token_cols, user_cols = Columns(APIToken, "k"), Columns(get_user_model(), "u")
        sql = (
            f"SELECT {token_cols.sql}, {user_cols.sql} "
            f'FROM "{APIToken._meta.db_table}" k JOIN "{user_cols.model._meta.db_table}" u ON u."{user_cols.model._meta.pk.column}" = k.user_id '
            "WHERE k.key_hash = %s"
        )
        _token_sql = (sql, token_cols, user_cols)
    sql, token_cols, user_cols = _token_sql
    with prepared_cursor() as cursor:
        cursor.execute(sql, [key_hash])
        row = cursor.fetchone()
    if row is None:
        return None
    n = len(token_cols.names)
    token = token_cols.build(row[:n])
    token.user = user_cols.build(row[n:])
    return token


def token_for(secret: str) -> APIToken | None:
    """The active token (with its user) whose secret this is, noting its use; None otherwise.

    Shared by HTTP (below) and websockets (sessions/streaming/wire.py), so both scope alike.
    """
    token = _token_with_user(APIToken.hash(secret))
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used is None or now - token.last_used >= LAST_USED_RESOLUTION:
        # Conditional, so concurrent requests write it once.
        APIToken.objects.filter(pk=token.pk).filter(
            Q(last_used__isnull=True) | Q(last_used__lte=now - LAST_USED_RESOLUTION)
        ).update(last_used=now)
    return token


def bearer_secret(header: bytes) -> str | None:
    """The secret of ``Bearer <secret>``; None when the header is not a well-formed bearer one."""
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


class BearerTokenAuthentication(BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None  # not ours: let session authentication have a go
        if len(parts) != 2:
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <token>'.")
        try:
            secret = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationFailed("Invalid API token.") from None
        token = token_for(secret)
        if token is None:
            raise AuthenticationFailed("Invalid API token.")
        return token.user, token

    def authenticate_header(self, request) -> str:
        # Without a WWW-Authenticate value DRF turns "not authenticated" into 403.
        return f'{self.keyword} realm="api"'

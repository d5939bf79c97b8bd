"""Bearer tokens: ``Authorization: Bearer <secret>``, looked up by the SHA-256 of the secret."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Q
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed

from sessions.models import APIToken

# last_used is for operators ("is this token still in use?"), not an audit log: writing it on every
# request would turn each read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


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
        token = APIToken.objects.select_related("user").filter(key_hash=APIToken.hash(secret)).first()
        if token is None or not token.user.is_active:
            raise AuthenticationFailed("Invalid API token.")
        now = timezone.now()
        if token.last_used is None or now - token.last_used >= LAST_USED_RESOLUTION:
            # Conditional, so concurrent requests write it once.
            APIToken.objects.filter(pk=token.pk).filter(
                Q(last_used__isnull=True) | Q(last_used__lte=now - LAST_USED_RESOLUTION)
            ).update(last_used=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        # Without a WWW-Authenticate value DRF turns "not authenticated" into 403.
        return f'{self.keyword} realm="api"'

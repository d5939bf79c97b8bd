"""``create_token USERNAME [--name NAME]``: issue an API token and print its secret, once.

The secret alone goes to stdout (so ``TOKEN=$(manage.py create_token alice)`` works); the hint on how
to use it goes to stderr.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from sessions.models import APIToken


class Command(BaseCommand):
    help = "Create an API bearer token for USERNAME and print the secret (it is shown only once)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="what the token is for, e.g. 'ci' or 'laptop'")

    def handle(self, *args, username: str, name: str, **options) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"no user named {username}") from None
        if not user.is_active:
            raise CommandError(f"user {username} is inactive; a token for it would not authenticate")
        token, secret = APIToken.issue(user, name=name[:100])
        self.stdout.write(secret)
        base = settings.BASE_URL.rstrip("/")
        self.stderr.write(
            f"Created API token {token.prefix}… for {username}"
            + (f" ({token.name})" if token.name else "")
            + ". It is shown only this once; store it now.\n"
            + f'Use it as:  curl -H "Authorization: Bearer {secret}" {base}/api/v1/sessions'
        )

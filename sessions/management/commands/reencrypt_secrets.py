"""Re-encrypt every environment secret under the first key of DEPUTIES_SECRETS_KEY (key rotation)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from sessions.models import EnvironmentSecret
from sessions.secrets import SecretError, reencrypt


class Command(BaseCommand):
    help = (
        "Re-encrypt all environment secrets with the first DEPUTIES_SECRETS_KEY key. Rotate by putting "
        "the new key first (NEW,OLD), running this, then dropping OLD."
    )

    def handle(self, *args, **options) -> None:
        count = 0
        with transaction.atomic():  # all or nothing: never half the secrets under a key being dropped
            for secret in EnvironmentSecret.objects.select_related("environment").select_for_update():
                try:
                    secret.ciphertext = reencrypt(secret.ciphertext)
                except SecretError:
                    raise CommandError(
                        f"Secret {secret.name} of environment {secret.environment.name!r} was written "
                        "with a key that is not in DEPUTIES_SECRETS_KEY; nothing was changed."
                    ) from None
                # A plain UPDATE: re-encrypting is not an edit, so no new environment revision.
                EnvironmentSecret.objects.filter(pk=secret.pk).update(ciphertext=secret.ciphertext)
                count += 1
        self.stdout.write(f"Re-encrypted {count} secret(s) with the current key.")

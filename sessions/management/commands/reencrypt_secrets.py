"""Re-encrypt every stored secret under the first key of DEPUTIES_SECRETS_KEY (key rotation):
environment secrets, and the encrypted columns integrations keep (``ENCRYPTED_COLUMNS``)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from sessions.models import EnvironmentSecret
from sessions.secrets import SecretError, reencrypt

# Other encrypted columns: (app label, model, field names). Empty values are left alone.
ENCRYPTED_COLUMNS = [
    ("webhooks", "WebhookSource", ("hmac_secret", "callback_secret")),
    ("deliveries", "CallbackSubscription", ("secret_ciphertext",)),
]


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
            count += self._columns()
        self.stdout.write(f"Re-encrypted {count} secret(s) with the current key.")

    def _columns(self) -> int:
        from django.apps import apps

        count = 0
        for label, name, fields in ENCRYPTED_COLUMNS:
            try:
                model = apps.get_model(label, name)
            except LookupError:
                continue
            for row in model.objects.select_for_update().only("pk", *fields):
                changes = {}
                for field in fields:
                    if value := getattr(row, field):
                        try:
                            changes[field] = reencrypt(value)
                        except SecretError:
                            raise CommandError(
                                f"{field} of {name} {row.pk} was written with a key that is not in "
                                "DEPUTIES_SECRETS_KEY; nothing was changed."
                            ) from None
                if changes:
                    model.objects.filter(pk=row.pk).update(**changes)
                    count += len(changes)
        return count

"""Rows that keep a revision number: environments and skills. A session records the revision it ran with."""

from __future__ import annotations

from django.db.models import F


class Revisioned:
    """Any edit of a saved row is a new revision. The count goes up in the database (``F``), so two
    concurrent edits make two revisions, and the instance reads back the number it got."""

    def save(self, *args, **kwargs) -> None:
        if self.pk and not kwargs.get("force_insert"):
            self.revision = F("revision") + 1
        super().save(*args, **kwargs)
        if self.pk:
            self.refresh_from_db(fields=["revision"])

"""Storing artifacts: metadata row in the database, bytes in ``default_storage`` (files or a bucket)."""

from __future__ import annotations

import hashlib

from django.core.files.base import ContentFile
from django.db import transaction

from sessions.events import emit
from sessions.models import Artifact
from sessions.storage import failure, storage_errors


def store_artifact(
    session_id: int,
    kind: str,
    name: str,
    data: bytes | str,
    *,
    run_id: int | None = None,
    content_type: str = "text/plain; charset=utf-8",
) -> Artifact:
    """Write the bytes first, then the row and its ``artifact_created`` event in one transaction.

    A store that refuses the bytes raises ``ArtifactStorageError`` naming the bucket, its endpoint
    and why; a run shows that message as its error.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    artifact = Artifact(
        session_id=session_id,
        run_id=run_id,
        kind=kind,
        name=name,
        content_type=content_type,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    try:
        artifact.file.save(name, ContentFile(data), save=False)
    except storage_errors() as exc:
        raise failure(f"could not store {kind} artifact {name!r}", artifact.file.storage, exc) from exc
    try:
        with transaction.atomic():
            artifact.save()
            emit(
                session_id,
                "artifact_created",
                {"artifact_id": artifact.pk, "kind": kind, "name": name, "size": artifact.size},
                run_id=run_id,
            )
    except Exception:
        artifact.file.delete(save=False)  # nothing half-written: no orphan bytes without a row
        raise
    return artifact

"""Where artifact bytes live: files under ``MEDIA_ROOT`` (Simple mode) or an S3 bucket (django-storages).

Only this module knows the difference. Callers ask for a download URL (``None``: stream the bytes
yourself), check that the bucket answers, and get an ``ArtifactStorageError`` naming the bucket, the
endpoint and the reason instead of a boto traceback. Keys never appear in a message.
"""

from __future__ import annotations

import logging
import sys
from urllib.parse import urlsplit

from django.conf import settings
from django.utils.http import content_disposition_header

logger = logging.getLogger(__name__)

# /setup and /readyz must answer quickly when the store does not: one attempt, short timeouts.
CHECK_TIMEOUTS = {"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}}

REASONS = {
    "404": "the bucket does not exist",
    "NoSuchBucket": "the bucket does not exist",
    "403": "access denied: check the keys and the bucket's policy",
    "AccessDenied": "access denied: check the keys and the bucket's policy",
    "InvalidAccessKeyId": "the store does not know this access key",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "301": "the bucket is in another region: set DEPUTIES_S3_REGION",
    "PermanentRedirect": "the bucket is in another region: set DEPUTIES_S3_REGION",
}


class ArtifactStorageError(Exception):
    """The store refused or could not be reached. The message is shown as a run's error as it is."""


def storage_errors() -> tuple[type[Exception], ...]:
    """What boto raises when the store refuses or does not answer (imported on first need)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def bucket_storage(storage=None):
    """The S3 backend in use (a django-storages ``S3Storage``), or None for files on disk.

    Files on disk never load boto3: the S3 module is in ``sys.modules`` only when a bucket backend
    was built, which reading ``__class__`` (of ``default_storage``, a lazy object) makes happen.
    """
    if storage is None:
        from django.core.files.storage import default_storage as storage
    cls = storage.__class__
    s3 = sys.modules.get("storages.backends.s3")
    return storage if s3 is not None and issubclass(cls, s3.S3Storage) else None


def describe(storage) -> str:
    """``bucket 'x' at host:port``: enough to find the store, nothing secret (no keys, no userinfo)."""
    where = "AWS S3"
    if storage.endpoint_url:
        parts = urlsplit(storage.endpoint_url)
        where = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    if storage.region_name:
        where += f" (region {storage.region_name})"
    return f"bucket {storage.bucket_name!r} at {where}"


def reason(exc: Exception) -> str:
    """One line a person can act on, from a boto error."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        known = REASONS.get(code)
        return f"{known} ({code})" if known else f"{code}: {error.get('Message') or 'refused'}"
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return f"the endpoint does not answer ({type(exc).__name__})"
    if isinstance(exc, NoCredentialsError):
        return "no credentials: set DEPUTIES_S3_ACCESS_KEY_ID and DEPUTIES_S3_SECRET_ACCESS_KEY"
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, Boto3Error) and isinstance(cause, storage_errors()):
        return reason(cause)  # S3UploadFailedError wraps the ClientError that says why
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def failure(action: str, storage, exc: Exception) -> ArtifactStorageError:
    """The error to raise instead of ``exc``: what was being done, where, and why."""
    s3 = bucket_storage(storage)
    where = describe(s3) if s3 is not None else "the artifact store"
    return ArtifactStorageError(f"{action} in {where}: {reason(exc)}")


def check_bucket() -> str:
    """Ask the bucket whether it is there and ours to use (HeadBucket); returns its description.

    Raises ``ArtifactStorageError`` with the reason. Only for a bucket backend: callers ask
    ``bucket_storage()`` first (files on disk have nothing to check).
    """
    from botocore.config import Config

    storage = bucket_storage()
    if storage is None:
        raise ValueError("artifacts are stored on the filesystem; there is no bucket to check")
    client = storage._create_session().client(
        "s3",
        region_name=storage.region_name,
        use_ssl=storage.use_ssl,
        endpoint_url=storage.endpoint_url,
        config=storage.client_config.merge(Config(**CHECK_TIMEOUTS)),
        verify=storage.verify,
    )
    try:
        client.head_bucket(Bucket=storage.bucket_name)
    except storage_errors() as exc:
        raise ArtifactStorageError(f"{describe(storage)}: {reason(exc)}") from exc
    finally:
        client.close()
    return describe(storage)


def download_url(artifact) -> str | None:
    """A presigned GET for the artifact, valid ``DEPUTIES_S3_URL_TTL`` seconds; None for files on disk.

    The caller has already checked that the user may see the artifact: anyone holding the URL can
    fetch it until it expires. The store answers with the artifact's name and type, as a download.
    """
    storage = bucket_storage(artifact.file.storage)
    if storage is None:
        return None
    parameters = {
        "ResponseContentDisposition": content_disposition_header(True, artifact.name),
        "ResponseContentType": artifact.content_type,
    }
    try:
        return storage.url(artifact.file.name, parameters=parameters, expire=settings.S3_URL_TTL)
    except storage_errors() as exc:
        error = failure(f"could not sign a download URL for artifact {artifact.pk}", storage, exc)
        logger.warning("%s", error)
        raise error from exc

"""The S3 backend for artifacts; imported only when ``DEPUTIES_S3_BUCKET`` is set (boto3 is slow to load)."""

from __future__ import annotations

import threading
from typing import Any

from storages.backends.s3 import S3Storage
from storages.utils import clean_name


class ArtifactS3Storage(S3Storage):
    """django-storages' S3 backend whose download URLs can be signed for another address.

    Workers and web reach the store at ``endpoint_url`` (``http://minio:9000`` inside compose); a
    browser follows the redirect from outside, so the URL is signed for ``public_endpoint_url`` when
    set. SigV4 signs the host, so rewriting a signed URL's host afterwards would break it.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._public = threading.local()

    def get_default_settings(self) -> dict[str, Any]:
        return {**super().get_default_settings(), "public_endpoint_url": None}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_public", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._public = threading.local()

    def public_client(self):
        client = getattr(self._public, "client", None)
        if client is None:
            client = self._create_session().client(
                "s3",
                region_name=self.region_name,
                use_ssl=self.use_ssl,
                endpoint_url=self.public_endpoint_url,
                config=self.client_config,
                verify=self.verify,
            )
            self._public.client = client
        return client

    def url(self, name, parameters=None, expire=None, http_method=None) -> str:
        if not self.public_endpoint_url:
            return super().url(name, parameters, expire, http_method)
        params = {
            **(parameters or {}),
            "Bucket": self.bucket_name,
            "Key": self._normalize_name(clean_name(name)),
        }
        return self.public_client().generate_presigned_url(
            "get_object",
            Params=params,
            ExpiresIn=self.querystring_expire if expire is None else expire,
            HttpMethod=http_method,
        )

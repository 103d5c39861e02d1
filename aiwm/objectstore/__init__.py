"""Object storage for model files: S3/MinIO, or a local directory served by the API.

Build one with :func:`object_store_for` when a program starts, call
``await store.ensure_ready()``, then ``put_file`` / ``stat`` / ``url`` / ``delete``.
Nodes download through :meth:`ObjectStore.url` the same way from either backend.
"""

from __future__ import annotations

from aiwm.objectstore.base import (
    MAX_EXPIRES_IN,
    ObjectStore,
    StoredObject,
    model_file_key,
    safe_filename,
    validate_key,
    validate_prefix,
    version_prefix,
)
from aiwm.objectstore.local import LocalFile, LocalStore
from aiwm.objectstore.s3 import S3Store, split_endpoint
from aiwm.settings import Settings

__all__ = [
    "MAX_EXPIRES_IN", "LocalFile", "LocalStore", "ObjectStore", "S3Store", "StoredObject",
    "model_file_key", "object_store_for", "safe_filename", "split_endpoint", "validate_key",
    "validate_prefix", "version_prefix",
]


def object_store_for(settings: Settings, *, public_url: str) -> ObjectStore:
    """S3 when MINIO_ENDPOINT is set, else a directory at ``AIWM_HOME/objects``.

    ``public_url`` is the API's base URL as nodes reach it (the local store's download
    URLs point there). Optional settings, read when present: ``minio_region`` and
    ``minio_public_endpoint`` (the storage's name as nodes reach it).
    """
    if settings.minio_endpoint:
        endpoint, secure = split_endpoint(settings.minio_endpoint, default_port=settings.minio_port,
                                          default_secure=settings.minio_use_ssl)
        return S3Store(
            endpoint=endpoint,
            access_key=settings.minio_access_key,
            secret_key=settings.minio_secret_key.get_secret_value(),
            secure=secure,
            bucket=settings.minio_bucket,
            region=settings.minio_region or None,
            public_endpoint=settings.minio_public_endpoint or None,
            noncurrent_days=settings.minio_noncurrent_days,
        )
    return LocalStore(root=settings.aiwm_home / "objects", public_url=public_url,
                      secret=settings.secret())

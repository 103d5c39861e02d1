"""The S3 backend (MinIO in production) through the ``minio`` client.

The client blocks, so every call runs in a thread. Each object's sha256 is computed
locally before the upload and kept as user metadata (``x-amz-meta-sha256``). Nodes fetch
with presigned GET URLs, which S3 checks itself (signature and expiry).

The bucket has versioning on, so :meth:`S3Store.delete` and
:meth:`S3Store.delete_prefix` leave recoverable noncurrent versions behind. AIWM keeps
one lifecycle rule of its own on the bucket (``aiwm-noncurrent-versions``, for keys under
``models/``): the storage removes a noncurrent version ``noncurrent_days`` after it was
replaced or deleted, then the delete marker left with nothing behind it, and abandons a
multipart upload still unfinished after a day. A bucket with lifecycle rules of other
origins is left alone (rewriting them through the client could change them), with a
warning that says which rule to add.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import urllib3.exceptions
from minio import Minio
from minio.commonconfig import Filter
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import (
    AbortIncompleteMultipartUpload,
    Expiration,
    LifecycleConfig,
    NoncurrentVersionExpiration,
    Rule,
)
from minio.versioningconfig import ENABLED, VersioningConfig

from aiwm.errors import Unavailable, ValidationFailed
from aiwm.objectstore.base import (
    StoredObject,
    check_expires_in,
    content_disposition,
    hash_file,
    safe_filename,
    validate_key,
    validate_prefix,
)

SHA256_META = "sha256"  # sent as x-amz-meta-sha256
_MISSING = {"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchVersion"}
LIFECYCLE_RULE = "aiwm-noncurrent-versions"
LIFECYCLE_PREFIX = "models/"  # every key AIWM writes
T = TypeVar("T")
log = logging.getLogger("aiwm.objectstore")


def lifecycle_rule(noncurrent_days: int) -> Rule:
    """AIWM's rule: noncurrent versions go ``noncurrent_days`` after they were replaced,
    then their lone delete markers; multipart uploads left unfinished go after a day."""
    return Rule(ENABLED, rule_filter=Filter(prefix=LIFECYCLE_PREFIX), rule_id=LIFECYCLE_RULE,
                noncurrent_version_expiration=NoncurrentVersionExpiration(noncurrent_days),
                expiration=Expiration(expired_object_delete_marker=True),
                abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(1))


def split_endpoint(value: str, *, default_port: int, default_secure: bool) -> tuple[str, bool]:
    """``host[:port]`` and whether to use TLS, from ``host``, ``host:port`` or a URL
    (``https://host[:port]``, whose scheme decides TLS). A bare host gets ``default_port``."""
    text = value.strip()
    if not text:
        raise ValidationFailed("the S3 endpoint is empty")
    if "://" in text:
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (parts.scheme not in ("http", "https") or not parts.hostname or port == -1
                or "@" in parts.netloc or parts.path not in ("", "/")):
            raise ValidationFailed(f"bad S3 endpoint {value!r}: expected http(s)://host[:port]")
        secure = parts.scheme == "https"
        host = parts.netloc
        return (host if port else f"{host}:{443 if secure else 80}"), secure
    if "/" in text:
        raise ValidationFailed(f"bad S3 endpoint {value!r}: expected host[:port]")
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        rest = text[text.find("]") + 1:]
        has_port = rest.startswith(":") and rest[1:].isdigit()
    else:
        name, _, digits = text.rpartition(":")
        has_port = bool(name) and digits.isdigit() and ":" not in name
    return (text if has_port else f"{text}:{default_port}"), default_secure


class S3Store:
    """Model files in an S3 bucket.

    ``endpoint`` is ``host:port`` of the S3 API as the controller reaches it;
    ``public_endpoint`` (``host:port`` or ``http(s)://host:port``), when nodes reach the
    storage under another name, is the one that download URLs name (presigning needs no
    network when ``region`` is given). ``clock`` gives unix seconds (URL signing time).
    """

    def __init__(self, *, endpoint: str, access_key: str, secret_key: str, secure: bool,
                 bucket: str, region: str | None = None, public_endpoint: str | None = None,
                 noncurrent_days: int = 7, clock: Callable[[], float] = time.time) -> None:
        if noncurrent_days < 0:
            raise ValidationFailed("noncurrent_days must be >= 0 (0: no lifecycle rule)")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.noncurrent_days = noncurrent_days
        self._clock = clock
        self._client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                             secure=secure, region=region)
        self._signer = self._client
        if public_endpoint:
            host, public_secure = split_endpoint(public_endpoint, default_port=443 if secure else 80,
                                                 default_secure=secure)
            # A region stops the signer asking the (maybe unreachable) public name for it.
            self._signer = Minio(host, access_key=access_key, secret_key=secret_key,
                                 secure=public_secure, region=region or "us-east-1")

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    async def ensure_ready(self) -> None:
        await self._call(self._ensure_ready)

    async def ping(self) -> dict[str, Any]:
        if not await self._call(self._client.bucket_exists, self.bucket):
            raise Unavailable(f"the bucket {self.bucket!r} does not exist at {self.endpoint}")
        return {"backend": "s3", "endpoint": self.endpoint, "bucket": self.bucket}

    async def put_file(self, key: str, path: Path, *, move: bool = False,
                       sha256: str | None = None) -> StoredObject:
        validate_key(key)
        stored = await self._call(self._put, key, Path(path), sha256)
        if move:
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)
        return stored

    async def stat(self, key: str) -> StoredObject | None:
        validate_key(key)
        return await self._call(self._stat, key)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._call(self._client.remove_object, self.bucket, key)

    async def delete_prefix(self, prefix: str) -> None:
        validate_prefix(prefix)
        await self._call(self._delete_prefix, prefix)

    async def url(self, key: str, *, expires_in: int, filename: str | None = None) -> str:
        validate_key(key)
        check_expires_in(expires_in)
        name = safe_filename(filename)
        headers = {"response-content-disposition": content_disposition(name)} if name else None
        signed_at = datetime.fromtimestamp(int(self._clock()), UTC)
        return await self._call(self._signer.presigned_get_object, self.bucket, key,
                                expires=timedelta(seconds=expires_in), response_headers=headers,
                                request_date=signed_at)

    # -- blocking parts, run in threads ------------------------------------------------

    def _ensure_ready(self) -> None:
        if not self._client.bucket_exists(self.bucket):
            try:
                self._client.make_bucket(self.bucket, location=self.region)
            except S3Error as e:
                if e.code != "BucketAlreadyOwnedByYou":  # another process made it first
                    raise
        if self._client.get_bucket_versioning(self.bucket).status != ENABLED:
            self._client.set_bucket_versioning(self.bucket, VersioningConfig(ENABLED))
        self._ensure_lifecycle()

    def _ensure_lifecycle(self) -> None:
        """Put AIWM's lifecycle rule on the bucket (or take it off, with 0 days) when the
        bucket has no rules but AIWM's. Rules of other origins are not rewritten (the
        client reads back some rule shapes only in part), nor are storage refusals
        (credentials without the right to change a bucket's lifecycle) fatal: both get a
        warning, and the space of deleted versions is then reclaimed only by whoever
        manages the bucket."""
        wanted = [lifecycle_rule(self.noncurrent_days)] if self.noncurrent_days else []
        try:
            current = self._client.get_bucket_lifecycle(self.bucket)
            rules = list(current.rules) if current is not None else []
            if rules == wanted:
                return
            others = sorted(str(r.rule_id) for r in rules if r.rule_id != LIFECYCLE_RULE)
            if others:
                ours = [r for r in rules if r.rule_id == LIFECYCLE_RULE]
                if ours != wanted:
                    log.warning(
                        "bucket %s has lifecycle rules AIWM did not make (%s), so AIWM leaves "
                        "its lifecycle as it is; its own rule %s would expire noncurrent "
                        "versions under %s after %d day(s) (0: no rule; MINIO_NONCURRENT_DAYS)",
                        self.bucket, ", ".join(others), LIFECYCLE_RULE, LIFECYCLE_PREFIX,
                        self.noncurrent_days)
                return
            if wanted:
                self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig(wanted))
            else:
                self._client.delete_bucket_lifecycle(self.bucket)
        except S3Error as e:
            self._lifecycle_refused(f"{e.code}: {e.message}")
        except ValueError as e:  # a rule the client cannot parse
            self._lifecycle_refused(f"its lifecycle configuration could not be read: {e}")

    def _lifecycle_refused(self, why: str) -> None:
        log.warning("bucket %s: could not set its lifecycle rule %s (%s); versions that are "
                    "deleted or replaced keep their space until removed (MINIO_NONCURRENT_DAYS)",
                    self.bucket, LIFECYCLE_RULE, why)

    def _put(self, key: str, path: Path, known_sha256: str | None = None) -> StoredObject:
        size, sha256 = (path.stat().st_size, known_sha256) if known_sha256 else hash_file(path)
        self._client.fput_object(self.bucket, key, str(path), metadata={SHA256_META: sha256})
        return StoredObject(key, size, sha256)

    def _stat(self, key: str) -> StoredObject | None:
        try:
            obj = self._client.stat_object(self.bucket, key)
        except S3Error as e:
            if e.code in _MISSING:
                return None
            raise
        sha256 = obj.metadata.get(f"x-amz-meta-{SHA256_META}") if obj.metadata else None
        return StoredObject(key, int(obj.size or 0), str(sha256) if sha256 else None)

    def _delete_prefix(self, prefix: str) -> None:
        names = (DeleteObject(str(o.object_name))
                 for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True))
        # remove_objects is lazy: iterating its result is what sends the deletes.
        errors = list(self._client.remove_objects(self.bucket, names))
        if errors:
            first = errors[0]
            raise Unavailable(f"could not delete {len(errors)} object(s) under {prefix!r}: "
                              f"{first.name}: {first.code} {first.message}")

    async def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except S3Error as e:
            raise Unavailable(f"object storage refused {fn.__name__} on bucket {self.bucket!r}: "
                              f"{e.code}: {e.message}", extra={"s3Code": e.code}) from e
        except (MinioException, urllib3.exceptions.HTTPError) as e:
            raise Unavailable(f"object storage unreachable ({fn.__name__}): {e}") from e

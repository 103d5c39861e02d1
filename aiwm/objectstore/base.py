"""What every object store offers, and the pure helpers both backends share.

Keys are ``/``-separated relative paths, the same in S3 and on disk; model files live at
``models/<orgId>/<modelId>/v<version>/<relative file name>`` (see :func:`model_file_key`).
Every key is checked by :func:`validate_key` before any backend touches it, so a key can
never escape the local store's root.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import quote

from aiwm.errors import ValidationFailed

MAX_KEY_BYTES = 1024  # S3's limit on an object name
MAX_EXPIRES_IN = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week
CHUNK = 1024 * 1024  # read/write unit when hashing and copying


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object in the store. ``sha256`` is lowercase hex; it is None only for an S3
    object that was written by something other than :meth:`ObjectStore.put_file`."""

    key: str
    size: int
    sha256: str | None


@runtime_checkable
class ObjectStore(Protocol):
    """Where model files live. Every method may raise :class:`aiwm.errors.ValidationFailed`
    for a bad key, and :class:`aiwm.errors.Unavailable` when the storage is unreachable."""

    async def ensure_ready(self) -> None:
        """Create what the store needs (directory; bucket with versioning). Idempotent:
        call it when a program starts."""
        ...

    async def ping(self) -> dict[str, Any]:
        """Check that the storage answers and can take files; facts about it for
        ``/api/health`` (its backend, and the free space or the bucket). Raises
        :class:`aiwm.errors.Unavailable` when it does not."""
        ...

    async def put_file(self, key: str, path: Path, *, move: bool = False,
                       sha256: str | None = None) -> StoredObject:
        """Store the finished local file ``path`` under ``key`` (replacing any object
        there) and return its size and sha256, computed while reading it in chunks, or
        taken from ``sha256`` when the caller already hashed the file as it wrote it.
        Without ``move``, ``path`` is left alone. With ``move=True`` the store consumes
        it: it renames it into place where it can (local store, same filesystem), else
        removes it once stored; if storing fails, ``path`` is left where it was."""
        ...

    async def stat(self, key: str) -> StoredObject | None:
        """The object under ``key``, or None when there is none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object under ``key``; a missing object is not an error."""
        ...

    async def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder ``prefix`` (it must end with ``/``, so that
        dropping ``.../v1/`` never touches ``.../v10/``), e.g. a half-made version."""
        ...

    async def url(self, key: str, *, expires_in: int, filename: str | None = None) -> str:
        """A signed GET URL for ``key`` valid for ``expires_in`` seconds (1 s to 7 days)
        that a node can fetch with no other credentials; it honours ``Range: bytes=N-``.
        ``filename`` becomes the download's Content-Disposition name. The object need not
        exist yet: fetching a missing one answers 404."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object name; raise ValidationFailed if not.

    Refused: empty, over 1024 bytes, absolute, backslashes, control characters, empty
    segments (``a//b``, a trailing ``/``), and ``.``/``..`` segments.
    """
    problem = _key_problem(key)
    if problem:
        raise ValidationFailed(f"bad object key {key!r}: {problem}",
                               extra={"errors": [{"field": "key", "message": problem,
                                                  "type": "value_error"}]})
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it names a folder of keys (a valid key plus a trailing ``/``)."""
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise ValidationFailed(f"bad object prefix {prefix!r}: it must end with '/'",
                               extra={"errors": [{"field": "prefix", "type": "value_error",
                                                  "message": "must end with '/'"}]})
    validate_key(prefix[:-1])
    return prefix


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return "must be a string"
    if not key:
        return "must not be empty"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return "must be relative (no leading '/')"
    if "\\" in key:
        return "must not contain backslashes"
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in key):
        return "must not contain control characters"
    for segment in key.split("/"):
        if segment == "":
            return "must not contain empty segments ('//' or a trailing '/')"
        if segment in (".", ".."):
            return "must not contain '.' or '..' segments"
    return None


def model_prefix(org_id: str, model_id: str) -> str:
    """The folder of all of one model's versions: ``models/<org>/<model>/``."""
    for name, part in (("orgId", org_id), ("modelId", model_id)):
        if not part or "/" in part:
            raise ValidationFailed(f"bad {name} {part!r} for an object key")
    return validate_prefix(f"models/{org_id}/{model_id}/")


def version_prefix(org_id: str, model_id: str, version: int) -> str:
    """The folder of one model version: ``models/<org>/<model>/v<version>/``."""
    if version < 1:
        raise ValidationFailed(f"bad model version {version}: versions start at 1")
    return validate_prefix(f"{model_prefix(org_id, model_id)}v{version}/")


def model_file_key(org_id: str, model_id: str, version: int, name: str) -> str:
    """The key of file ``name`` (relative, may contain ``/``) of one model version."""
    return validate_key(version_prefix(org_id, model_id, version) + name)


async def signed_files(objects: Any, version: dict[str, Any],
                       expires_in: int) -> list[dict[str, Any]]:
    """``[{name, size, sha256, url}]`` for each file of a model version document: URLs
    signed for ``expires_in`` seconds, each naming its file for a browser's download."""
    return [{"name": f["name"], "size": f["size"], "sha256": f["sha256"],
             "url": await objects.url(f["key"], expires_in=expires_in,
                                      filename=f["name"].rsplit("/", 1)[-1])}
            for f in version["files"]]


def check_expires_in(expires_in: int) -> int:
    if not isinstance(expires_in, int) or not 1 <= expires_in <= MAX_EXPIRES_IN:
        raise ValidationFailed(f"expires_in must be 1 to {MAX_EXPIRES_IN} seconds, not {expires_in!r}")
    return expires_in


def safe_filename(name: str | None) -> str | None:
    """``name`` reduced to a plain download name: its last path segment, without control
    characters or quotes. None when nothing usable is left."""
    if not name:
        return None
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c for c in last if ord(c) >= 32 and ord(c) != 127 and c not in '"').strip()
    return cleaned if cleaned not in ("", ".", "..") else None


def content_disposition(filename: str) -> str:
    """An RFC 6266 ``attachment`` header value for an already :func:`safe_filename` name."""
    quoted = quote(filename, safe="")
    if quoted == filename:
        return f'attachment; filename="{filename}"'
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


def hash_file(path: Path) -> tuple[int, str]:
    """Size and sha256 of ``path``, read in chunks (blocking: call it in a thread)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        return f.tell(), digest.hexdigest()


def copy_hashing(src: Path, dst: BinaryIO) -> tuple[int, str]:
    """Copy ``src`` into the open file ``dst`` chunk by chunk, hashing as it goes; return
    the size and sha256 (blocking: call it in a thread)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(src, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            dst.write(view[:n])
            size += n
    return size, digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

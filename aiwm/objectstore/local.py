"""The embedded object store: a directory under AIWM_HOME, served by the API itself.

Layout under ``root``::

    data/<key>        the object's bytes
    meta/<key>.json   {"size", "sha256", "ino", "mtime_ns"} of that file
    tmp/              files being written; renamed into data/ once complete

An object appears only when complete (rename), and its metadata names the exact file it
describes (inode and mtime), so a crash or two racing writers can at worst make
:meth:`LocalStore.stat` hash the file again, never report a wrong sha256.

Download URLs point at ``GET {public_url}/api/files/{key}`` (``serve/files.py``), signed
with :mod:`aiwm.objectstore.signing` over the key and expiry. The optional ``filename``
parameter (the download's Content-Disposition name) is not signed: changing it only
renames the download, and the route reduces it to a plain name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from aiwm.errors import AlreadyExists, Unavailable
from aiwm.objectstore import signing
from aiwm.objectstore.base import (
    StoredObject,
    check_expires_in,
    copy_hashing,
    fsync_dir,
    hash_file,
    safe_filename,
    validate_key,
    validate_prefix,
)

FILES_ROUTE = "/api/files/"  # where serve/files.py is mounted


@dataclass(frozen=True, slots=True)
class LocalFile:
    """An object's file, for the API to serve."""

    path: Path
    stat: os.stat_result
    sha256: str


class LocalStore:
    """Model files in a local directory, fetched by nodes through HMAC-signed API URLs.

    ``public_url`` is the API's base URL as nodes reach it (no trailing ``/api``);
    ``secret`` is the JWT secret (``settings.secret()``), from which the URL-signing key
    is derived; ``clock`` gives unix seconds; ``fsync`` makes each put durable before it
    returns.
    """

    def __init__(self, *, root: Path, public_url: str, secret: str,
                 clock: Callable[[], float] = time.time, fsync: bool = True) -> None:
        self.root = Path(root)
        self.public_url = public_url.rstrip("/")
        self._key = signing.signing_key(secret)
        self._clock = clock
        self._fsync = fsync
        self._data = self.root / "data"
        self._meta = self.root / "meta"
        self._tmp = self.root / "tmp"

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r}, public_url={self.public_url!r})"

    # -- the ObjectStore protocol ------------------------------------------------------

    async def ensure_ready(self) -> None:
        await asyncio.to_thread(self._ensure_ready)

    async def ping(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._ping)

    async def put_file(self, key: str, path: Path, *, move: bool = False,
                       sha256: str | None = None) -> StoredObject:
        validate_key(key)
        return await asyncio.to_thread(self._put, key, Path(path), move, sha256)

    async def stat(self, key: str) -> StoredObject | None:
        found = await self.file(key)
        return None if found is None else StoredObject(key, found.stat.st_size, found.sha256)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await asyncio.to_thread(self._delete, key)

    async def delete_prefix(self, prefix: str) -> None:
        validate_prefix(prefix)
        await asyncio.to_thread(self._delete_prefix, prefix)

    async def url(self, key: str, *, expires_in: int, filename: str | None = None) -> str:
        validate_key(key)
        expires = int(self._clock()) + check_expires_in(expires_in)
        query = {"expires": str(expires), "sig": signing.sign(key, expires, self._key)}
        name = safe_filename(filename)
        if name:
            query["filename"] = name
        return f"{self.public_url}{FILES_ROUTE}{quote(key, safe='/')}?{urlencode(query)}"

    # -- for the file route ------------------------------------------------------------

    def verify(self, key: str, expires: str | None, sig: str | None) -> None:
        """Check a request's ``expires`` and ``sig`` for ``key``; raises SignatureInvalid
        or SignatureExpired (both 403) when the URL was altered or is too old."""
        signing.verify_query(key, expires, sig, self._key, self._clock())

    async def file(self, key: str) -> LocalFile | None:
        """The file holding ``key`` and its sha256, or None when there is no such object."""
        validate_key(key)
        return await asyncio.to_thread(self._file, key)

    # -- blocking parts, run in threads ------------------------------------------------

    def _ensure_ready(self) -> None:
        for folder in (self._data, self._meta, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def _ping(self) -> dict[str, Any]:
        try:
            self._ensure_ready()
            if not os.access(self._tmp, os.W_OK):
                raise Unavailable(f"the object store's folder {self.root} is not writable")
            fs = os.statvfs(self.root)
        except OSError as e:
            raise Unavailable(f"the object store's folder {self.root}: {e.strerror or e}") from e
        return {"backend": "local", "freeBytes": fs.f_bavail * fs.f_frsize}

    def _put(self, key: str, src: Path, move: bool, known_sha256: str | None = None) -> StoredObject:
        self._ensure_ready()
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        os.close(fd)
        tmp = Path(tmp_name)
        moved = False
        try:
            moved = move and _try_rename(src, tmp)
            if moved:
                # A file moved in as it is needs no second read when its hash is known.
                size, sha256 = ((tmp.stat().st_size, known_sha256) if known_sha256
                                else hash_file(tmp))
                if self._fsync:
                    _fsync_path(tmp)
            else:
                with open(tmp, "wb") as out:
                    size, sha256 = copy_hashing(src, out)
                    if self._fsync:
                        out.flush()
                        os.fsync(out.fileno())
            self._publish(key, tmp, size, sha256)
        except BaseException:
            if moved:
                with contextlib.suppress(OSError):
                    os.replace(tmp, src)  # give the caller its file back
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        if move and not moved:
            src.unlink(missing_ok=True)
        return StoredObject(key, size, sha256)

    def _publish(self, key: str, tmp: Path, size: int, sha256: str) -> None:
        """Write the metadata, then rename ``tmp`` into place (the object appears whole)."""
        st = tmp.stat()
        meta = {"size": size, "sha256": sha256, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}
        dest = self._data / key
        # Another delete may prune an empty parent between mkdir and rename: try again.
        for attempt in range(3):
            try:
                self._write_meta(key, meta)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
                break
            except FileNotFoundError:
                if attempt == 2 or not tmp.exists():
                    raise
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
                raise AlreadyExists(f"object key {key!r} clashes with an existing object or "
                                    "folder (a key cannot be both a file and a prefix here)") from e
        if self._fsync:
            fsync_dir(dest.parent)

    def _write_meta(self, key: str, meta: dict[str, object]) -> None:
        path = self._meta_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="meta-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def _meta_path(self, key: str) -> Path:
        return self._meta / f"{key}.json"

    def _file(self, key: str) -> LocalFile | None:
        path = self._data / key
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        meta = self._read_meta(key)
        if meta is not None and (meta.get("size"), meta.get("ino"), meta.get("mtime_ns")) == (
                st.st_size, st.st_ino, st.st_mtime_ns) and isinstance(meta.get("sha256"), str):
            return LocalFile(path, st, str(meta["sha256"]))
        # Metadata lost or stale (crash between writes, a racing writer): hash again.
        size, sha256 = hash_file(path)
        st = path.stat()
        if size == st.st_size:
            with contextlib.suppress(OSError):
                self._write_meta(key, {"size": size, "sha256": sha256, "ino": st.st_ino,
                                       "mtime_ns": st.st_mtime_ns})
        return LocalFile(path, st, sha256)

    def _read_meta(self, key: str) -> dict[str, object] | None:
        try:
            with open(self._meta_path(key)) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _delete(self, key: str) -> None:
        for path in (self._data / key, self._meta_path(key)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                path.unlink()
            self._prune(path.parent)

    def _delete_prefix(self, prefix: str) -> None:
        folder = prefix.rstrip("/")
        for tree in (self._data, self._meta):
            path = tree / folder
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                continue  # a plain object named like the folder is not under the prefix
            self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove empty folders from ``folder`` up to (not including) the trees' roots."""
        while folder not in (self._data, self._meta, self.root) and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


def _try_rename(src: Path, dst: Path) -> bool:
    """Rename ``src`` over ``dst``; False when they are on different filesystems."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EACCES):
            return False
        raise
    return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

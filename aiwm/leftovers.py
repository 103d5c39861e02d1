"""Staging folders under AIWM_HOME that nothing will finish, and their removal.

A HuggingFace import fetches into ``<AIWM_HOME>/imports/<tag>`` and keeps what it got
when it fails, so that a retry resumes; an import that is never retried leaves it
there. An upload streams into ``<AIWM_HOME>/tmp/upload-*`` and removes it when it ends,
but not when its process is killed. Both hold an exclusive ``flock`` on a file in the
folder while they work (the OS releases it when the process dies), so a folder is
stale when no one holds its lock and nothing in it was written for a while:
``import_ttl`` for imports (a retry the next day should still resume), ``upload_ttl``
for uploads (which never resume).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("aiwm.leftovers")
IMPORT_LOCK = Path(".aiwm-import") / "lock"  # aiwm.model_import holds it while fetching
UPLOAD_LOCK = Path(".lock")  # serve.model_files holds it while an upload streams in
UPLOAD_TTL = 3600.0


@dataclass(frozen=True)
class Leftover:
    path: Path
    kind: str  # "import" or "upload"
    idle: float  # seconds since anything in it was written
    bytes: int


def _activity(folder: Path) -> tuple[float, int]:
    """The newest mtime in ``folder`` (itself included) and the bytes of its files.
    Links are not followed."""
    newest, size = folder.lstat().st_mtime, 0
    for where, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(where, name))
            except FileNotFoundError:
                continue  # removed while we looked
            newest = max(newest, st.st_mtime)
            if name in files:
                size += st.st_size
    return newest, size


@contextlib.contextmanager
def working_in(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s upload lock, made by the caller just now: :func:`sweep` leaves the
    folder alone meanwhile (and never takes the lock of a folder that new)."""
    fd = os.open(folder / UPLOAD_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def locked(path: Path) -> bool:
    """Whether a process holds an exclusive flock on ``path`` (False if there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return False


def find(home: Path, *, import_ttl: float, upload_ttl: float = UPLOAD_TTL,
         now: float | None = None) -> list[Leftover]:
    """The stale staging folders under ``home``, oldest activity first."""
    now = time.time() if now is None else now
    candidates = [(p, "import", IMPORT_LOCK, import_ttl) for p in _dirs(home / "imports")]
    candidates += [(p, "upload", UPLOAD_LOCK, upload_ttl)
                   for p in _dirs(home / "tmp") if p.name.startswith("upload-")]
    found = []
    for path, kind, lock, ttl in candidates:
        try:
            newest, size = _activity(path)
        except FileNotFoundError:
            continue
        if now - newest >= ttl and not locked(path / lock):
            found.append(Leftover(path=path, kind=kind, idle=now - newest, bytes=size))
    return sorted(found, key=lambda f: -f.idle)


def _dirs(parent: Path) -> list[Path]:
    try:
        return [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []


def sweep(home: Path, *, import_ttl: float, upload_ttl: float = UPLOAD_TTL,
          now: float | None = None) -> list[Leftover]:
    """Remove the stale staging folders under ``home``; returns what was removed.

    Each is removed holding its lock, after a rename out of the way: an import that
    starts on the same folder meanwhile either finds the lock taken (its attempt fails
    and is retried) or makes a fresh folder; it never loses files while it writes."""
    removed = []
    for left in find(home, import_ttl=import_ttl, upload_ttl=upload_ttl, now=now):
        lock = IMPORT_LOCK if left.kind == "import" else UPLOAD_LOCK
        try:
            fd = os.open(left.path / lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                         0o600)
        except OSError:
            fd = -1  # no lock file can be made (its folder is gone): nothing to guard
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # someone started working in it just now
            doomed = left.path.with_name(f".removing-{left.path.name}")
            try:
                left.path.rename(doomed)
            except FileNotFoundError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
        finally:
            if fd >= 0:
                os.close(fd)
        if doomed.exists():
            log.warning("could not remove the stale %s folder %s (now %s)", left.kind,
                        left.path, doomed)
            continue
        log.info("removed the %s staging folder %s: %d byte(s), untouched for %.1f h and "
                 "no process working in it", left.kind, left.path, left.bytes, left.idle / 3600)
        removed.append(left)
    return removed

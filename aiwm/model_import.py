"""Fetch a HuggingFace model repo into a local staging directory, resumably.

:func:`list_repo_files` resolves the revision to one commit and lists its files (with the
Hub's sizes and LFS sha256s); :func:`fetch_repo` downloads them, every file from that one
commit, into ``staging_dir/<name>``. Both block: run them in a thread.

Resume. A file is streamed to ``staging_dir/.aiwm-import/partial/<commit>/<name>`` and
moved to its real name only once its size and sha256 check out; ``manifest.json`` in the
same folder records each finished file. Calling :func:`fetch_repo` again after a failure,
a cancel or a killed process skips the finished files and continues a partial one with an
HTTP ``Range`` request. There is no retry inside a call: the caller's retry policy calls
again, and the call picks up where the last one stopped.

huggingface_hub provides the metadata call, the file URLs, the auth headers, its shared
HTTP client (so a client factory set for proxies or certificates applies here too) and the
mapping of Hub answers to its errors. Its own ``hf_hub_download`` is not used for the
bytes: it deletes its partial file when a download fails, so it cannot resume.

Nothing here sets environment variables or uses ``~/.cache/huggingface``: the endpoint
and token are arguments (``settings.hf_endpoint``, ``settings.huggingface_api_key``); no
endpoint means huggingface_hub's default, no token means anonymous (never a saved token).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import httpx2
from huggingface_hub import HfApi, get_session, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, filter_repo_objects, hf_raise_for_status

from aiwm.errors import (
    AiwmError,
    Cancelled,
    ChecksumMismatch,
    Forbidden,
    InvalidState,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)

STATE_DIR = ".aiwm-import"
"""Folder inside the staging directory for partial files, the manifest and the lock."""
CHUNK_BYTES = 1024 * 1024
TIMEOUT = httpx2.Timeout(60.0, connect=10.0)
_HEX = frozenset("0123456789abcdef")




@dataclass(frozen=True)
class RepoFile:
    """One file of a repo. ``size`` and ``sha256`` come from the Hub (``sha256`` only for
    LFS files); :func:`fetch_repo` returns them filled from the bytes it checked."""

    name: str
    size: int | None
    sha256: str | None


@dataclass
class ImportProgress:
    bytes_done: int
    bytes_total: int | None
    files_done: int
    files_total: int
    current: str | None


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path; :class:`ValidationFailed` if it
    could escape the staging directory or clash with its :data:`STATE_DIR`."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or any(p in ("", ".", "..") for p in parts) or parts[0] == STATE_DIR):
        raise ValidationFailed(f"unsafe file name {name!r} in the repo", extra={"file": name})
    return name


def select_files(files: list[RepoFile], allow_patterns: list[str] | None) -> list[RepoFile]:
    """The files matching any of ``allow_patterns`` (fnmatch, as huggingface_hub's
    ``allow_patterns``: ``*`` crosses ``/``, ``dir/`` means everything under it).
    ``None`` or an empty list keeps every file."""
    return list(filter_repo_objects(files, allow_patterns=allow_patterns or None, key=lambda f: f.name))


def list_repo_files(*, repo_id: str, revision: str | None, allow_patterns: list[str] | None,
                    endpoint: str | None, token: str | None) -> tuple[str, list[RepoFile]]:
    """Resolve ``revision`` (a branch, tag or commit; ``None`` is ``main``) and list the
    files to fetch, sorted by name: ``(commit sha, files)``.

    Raises :class:`NotFound` for an unknown repo or revision or when no file matches the
    patterns, :class:`Unauthorized`/:class:`Forbidden` when the Hub refuses access and
    :class:`Unavailable` when it cannot be reached.
    """
    where = _Where(repo_id=repo_id, revision=revision or "main", endpoint=endpoint, has_token=bool(token))
    api = HfApi(endpoint=_clean(endpoint), token=token or False, library_name="aiwm")
    with _hub_errors(where):
        info = api.model_info(repo_id, revision=revision, files_metadata=True,
                              timeout=TIMEOUT.read)
    commit = info.sha or ""
    if len(commit) != 40 or not set(commit) <= _HEX:
        raise AiwmError(f"{where.hub} answered for {repo_id} without a commit sha; is HF_ENDPOINT "
                        "the address of a HuggingFace Hub?", extra=where.extra())
    listed = [RepoFile(name=s.rfilename, size=s.lfs.size if s.lfs else s.size,
                       sha256=s.lfs.sha256.lower() if s.lfs else None) for s in info.siblings or []]
    selected = sorted(select_files(listed, allow_patterns), key=lambda f: f.name)
    if not selected:
        wanted = f"matches {allow_patterns}" if allow_patterns else "exists"
        raise NotFound(f"no file of HuggingFace repo {repo_id} at {where.revision} {wanted}",
                       extra={**where.extra(), "allowPatterns": allow_patterns})
    try:
        for file in selected:
            check_name(file.name)
    except ValidationFailed as e:
        raise ValidationFailed(f"HuggingFace repo {repo_id} at {commit}: {e.detail}",
                               extra={**where.extra(), **e.extra}) from e
    return commit, selected


def fetch_repo(*, repo_id: str, revision: str | None, allow_patterns: list[str] | None,
               staging_dir: Path, endpoint: str | None, token: str | None,
               progress: Callable[[ImportProgress], None] | None = None,
               cancel: threading.Event | None = None,
               clock: Callable[[], float] = time.monotonic,
               progress_interval: float = 0.5) -> tuple[str, list[tuple[RepoFile, Path]]]:
    """Download the selected files of one commit into ``staging_dir``; return the commit
    sha and ``(file, path)`` pairs whose ``RepoFile`` carries the checked size and sha256.

    ``progress`` is called when each file starts and ends, and at most every
    ``progress_interval`` seconds (by ``clock``) while bytes arrive. ``cancel`` is checked
    before each file and each chunk; when set, :class:`Cancelled` is raised. After any
    error, calling again with the same ``staging_dir`` resumes. Besides the errors of
    :func:`list_repo_files`: :class:`ChecksumMismatch` for bad bytes, :class:`Unavailable`
    for a broken transfer, :class:`InvalidState` while another call uses ``staging_dir``.
    """
    commit, files = list_repo_files(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns,
                                    endpoint=endpoint, token=token)
    where = _Where(repo_id=repo_id, revision=commit, endpoint=endpoint, has_token=bool(token))
    staging_dir.mkdir(parents=True, exist_ok=True)
    root = staging_dir.resolve()
    state = root / STATE_DIR
    partial_root = state / "partial"
    with _locked(state / "lock", root):
        for old in partial_root.glob("*"):
            if old.name != commit:  # a branch moved: those bytes belong to another commit
                shutil.rmtree(old, ignore_errors=True)
        manifest = _Manifest(state / "manifest.json")
        sizes = [f.size for f in files]
        tracker = _Tracker(progress, clock=clock, interval=progress_interval, files_total=len(files),
                           bytes_total=None if None in sizes else sum(s or 0 for s in sizes))
        tracker.emit()
        headers = build_hf_headers(token=token or False, library_name="aiwm")
        done: list[tuple[RepoFile, Path]] = []
        for file in files:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"import of {repo_id} cancelled; call again to resume", extra=where.extra())
            target = root / file.name
            if not target.resolve().is_relative_to(root):  # a symlink in the staging dir
                raise ValidationFailed(f"file {file.name!r} leads outside {root}", extra={"file": file.name})
            finished = manifest.finished(file, commit, target)
            tracker.current = file.name
            if finished is None:
                tracker.emit()
                url = hf_hub_url(repo_id, file.name, revision=commit, endpoint=_clean(endpoint))
                finished = _download(url=url, headers=headers, file=file, target=target, where=where,
                                     part=partial_root / commit / file.name, cancel=cancel, tracker=tracker)
                manifest.record(finished, commit)
            else:
                tracker.add(finished.size or 0)
            tracker.files_done += 1
            tracker.emit()
            done.append((finished, target))
        shutil.rmtree(partial_root, ignore_errors=True)
        tracker.current = None
        tracker.emit()
    return commit, done


def _download(*, url: str, headers: dict[str, str], file: RepoFile, part: Path, target: Path,
              where: _Where, cancel: threading.Event | None, tracker: _Tracker) -> RepoFile:
    """Continue ``part`` from its current size, check it, and move it to ``target``."""
    part.parent.mkdir(parents=True, exist_ok=True)
    part.touch()
    with part.open("r+b") as out:
        have = out.seek(0, os.SEEK_END)
        if file.size is not None and have > file.size:
            have = _restart(out)
        digest = _hash_prefix(out, have)
        tracker.add(have)
        if file.size is None or have < file.size:
            # identity: a Range over a gzip-encoded body would count compressed bytes
            request = {**headers, "Accept-Encoding": "identity"}
            if have:
                request["Range"] = f"bytes={have}-"
            with _hub_errors(where, file.name), \
                    get_session().stream("GET", url, headers=request, timeout=TIMEOUT) as response:
                if response.status_code == 416:
                    _restart(out)
                    raise Unavailable(f"the Hub refused to resume {file.name}; its partial file was "
                                      "discarded, call again", extra=where.extra(file.name))
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                if have and response.status_code != 206:  # the server ignored Range: start over
                    tracker.add(-have)
                    have, digest = _restart(out), hashlib.sha256()
                try:
                    for chunk in response.iter_bytes():  # as received: a break keeps every byte
                        if cancel is not None and cancel.is_set():
                            raise Cancelled(f"import of {where.repo_id} cancelled during {file.name}; "
                                            "call again to resume", extra=where.extra(file.name))
                        out.write(chunk)
                        digest.update(chunk)
                        have += len(chunk)
                        tracker.add(len(chunk), during=True)
                        if file.size is not None and have > file.size:
                            break
                except httpx2.TransportError as e:
                    out.flush()
                    raise Unavailable(f"download of {file.name} from {where.repo_id} broke off after "
                                      f"{have} of {file.size} bytes ({e}); call again to resume",
                                      extra=where.extra(file.name)) from e
        out.flush()
        os.fsync(out.fileno())
    _check(file, have, digest.hexdigest(), part, where)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)
    return replace(file, size=have, sha256=digest.hexdigest())


def _check(file: RepoFile, size: int, sha256: str, part: Path, where: _Where) -> None:
    if file.size is not None and size < file.size:
        raise Unavailable(f"download of {file.name} ended after {size} of {file.size} bytes; "
                          "call again to resume", extra=where.extra(file.name))
    wrong = (f"{size} bytes instead of {file.size}" if file.size is not None and size != file.size
             else f"sha256 {sha256} instead of {file.sha256}" if file.sha256 and sha256 != file.sha256
             else None)
    if wrong:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{file.name} of {where.repo_id} at {where.revision} arrived with {wrong}; "
                               "it was deleted, call again to download it afresh",
                               extra={**where.extra(file.name), "expected": file.sha256, "actual": sha256})


def _restart(out: BinaryIO) -> int:
    out.seek(0)
    return out.truncate()


def _hash_prefix(f: BinaryIO, size: int) -> hashlib._Hash:
    """The sha256 state after the first ``size`` bytes of ``f`` (a partial being resumed)."""
    digest = hashlib.sha256()
    f.seek(0)
    while f.tell() < size:
        digest.update(f.read(min(CHUNK_BYTES, size - f.tell())))
    f.seek(size)
    return digest


def _clean(endpoint: str | None) -> str | None:
    return endpoint.rstrip("/") if endpoint else None


@dataclass(frozen=True)
class _Where:
    """What a request was about, for error messages (whether a token was sent, not which)."""

    repo_id: str
    revision: str
    endpoint: str | None
    has_token: bool

    @property
    def hub(self) -> str:
        return f"the HuggingFace Hub at {_clean(self.endpoint) or 'huggingface.co (or $HF_ENDPOINT)'}"

    def extra(self, file: str | None = None) -> dict[str, Any]:
        return {"repoId": self.repo_id, "revision": self.revision, **({"file": file} if file else {})}


@contextmanager
def _hub_errors(where: _Where, file: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into the domain's."""
    extra = where.extra(file)
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code
        said = f" ({e.server_message})" if e.server_message else ""
        if status == 401 and where.has_token:
            raise Unauthorized(f"{where.hub} refused the token (HUGGINGFACE_API_KEY) for {where.repo_id}"
                               f"{said}", extra=extra) from e
        if status == 401:  # the Hub answers 401 to anonymous requests for private and missing repos
            raise Unauthorized(f"HuggingFace repo {where.repo_id} is private, gated or missing: set "
                               f"HUGGINGFACE_API_KEY to a token that can read it{said}", extra=extra) from e
        if status == 403:
            raise Forbidden(f"the token may not read HuggingFace repo {where.repo_id}{said}",
                            extra=extra) from e
        if isinstance(e, RevisionNotFoundError):
            raise NotFound(f"revision {where.revision!r} not found in HuggingFace repo {where.repo_id}",
                           extra=extra) from e
        if isinstance(e, RemoteEntryNotFoundError):
            raise NotFound(f"file {file!r} not found in HuggingFace repo {where.repo_id} at "
                           f"{where.revision}", extra=extra) from e
        if status == 404:
            raise NotFound(f"HuggingFace repo {where.repo_id} not found on {where.hub}", extra=extra) from e
        if status in (408, 429) or status >= 500:
            raise Unavailable(f"{where.hub} answered {status} for {where.repo_id}{said}; try again later",
                              extra=extra) from e
        raise AiwmError(f"{where.hub} answered {status} for {where.repo_id}{said}",
                        extra={**extra, "status": status}) from e
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        raise Unavailable(f"cannot reach {where.hub} for {where.repo_id}: {e or type(e).__name__}",
                          extra=extra) from e
    except HFValidationError as e:
        raise ValidationFailed(f"invalid HuggingFace repo id or revision: {e}", extra=extra) from e


@contextmanager
def _locked(path: Path, staging_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the staging directory (released by the OS if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidState(f"another import is writing to {staging_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Manifest:
    """``{name: {commit, size, sha256}}`` of the files finished in this staging directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text())["files"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            self.entries = {}

    def finished(self, file: RepoFile, commit: str, target: Path) -> RepoFile | None:
        """The checked file if ``target`` already holds it (same commit, or same content)."""
        entry = self.entries.get(file.name)
        if entry is None or not target.is_file() or target.stat().st_size != entry.get("size"):
            return None
        same = entry.get("commit") == commit or (file.sha256 is not None
                                                 and entry.get("sha256") == file.sha256)
        if not same or (file.size is not None and file.size != entry["size"]):
            return None
        return replace(file, size=entry["size"], sha256=entry["sha256"])

    def record(self, file: RepoFile, commit: str) -> None:
        self.entries[file.name] = {"commit": commit, "size": file.size, "sha256": file.sha256}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"files": self.entries}))
        os.replace(tmp, self.path)


class _Tracker:
    """Counts bytes and files and calls the progress callback, throttled while bytes flow."""

    def __init__(self, callback: Callable[[ImportProgress], None] | None, *, clock: Callable[[], float],
                 interval: float, files_total: int, bytes_total: int | None) -> None:
        self.callback, self.clock, self.interval = callback, clock, interval
        self.files_total, self.bytes_total = files_total, bytes_total
        self.bytes_done = self.files_done = 0
        self.current: str | None = None
        self._last = clock()

    def add(self, n: int, *, during: bool = False) -> None:
        self.bytes_done += n
        if during and self.clock() - self._last >= self.interval:
            self.emit()

    def emit(self) -> None:
        self._last = self.clock()
        if self.callback is not None:
            self.callback(ImportProgress(bytes_done=self.bytes_done, bytes_total=self.bytes_total,
                                         files_done=self.files_done, files_total=self.files_total,
                                         current=self.current))

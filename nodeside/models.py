"""The node's model cache and the ``model.download`` / ``model.delete`` commands.

A stored version of a model lives in ``<model dir>/<modelId>/v<version>/<file name>``
(a download that names no version: ``<model dir>/<modelId>/<file name>``); deployments
mount (docker) or are pointed at (process) that directory, so two deployments of one
model on one node can run different versions. A file is written to a temporary name and
renamed once complete and checked, so a file under its real name is always whole: that
is what lets a repeated download skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import httpx

from aiwm.protocol import ModelDeleteData, ModelDownloadData, ModelFile, ModelPruneData
from nodeside.handlers import CURRENT_COMMAND, CommandFailed, Emit, parse

log = logging.getLogger("aiwm.node.models")
CHUNK = 1024 * 1024


VERSION_DIR = re.compile(r"v[1-9][0-9]*")
# Written in a version's folder once every file of the version is there and checked;
# removed before any file of it is fetched. A server is started only on a folder with it.
COMPLETE = ".aiwm-complete"


def is_version_dir(entry: Path) -> bool:
    """Whether ``entry``, inside a model's folder, is one of its version folders
    (``v<N>``, a real directory, not a link)."""
    return bool(VERSION_DIR.fullmatch(entry.name)) and entry.is_dir() and not entry.is_symlink()


def complete(version_dir: Path) -> bool:
    """Whether a version's folder holds the whole version (its download finished)."""
    return (version_dir / COMPLETE).is_file()


def model_subdir(root: Path, model_id: str, version: int | None = None) -> Path:
    """The directory of one model, or of one version of it (``v<version>`` inside it);
    ``invalid_spec`` for an id that is not one path part."""
    if model_id in (".", "..") or any(c in model_id for c in "/\\\0"):
        raise CommandFailed("invalid_spec", f"model id {model_id!r} is not a valid directory name")
    return root / model_id if version is None else root / model_id / f"v{version}"


def file_target(model_dir: Path, name: str) -> Path:
    """Where a model file goes; ``invalid_spec`` for a name that would land outside."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or "\\" in name or "\0" in name or not rel.parts \
            or any(part == ".." for part in rel.parts):
        raise CommandFailed("invalid_spec", f"file name {name!r} must stay inside the model")
    if rel.parts == (COMPLETE,):
        raise CommandFailed("invalid_spec", f"file name {name!r} is the agent's own marker")
    target = model_dir.joinpath(*rel.parts)
    # A symlink already in the model dir could still lead out of it.
    if not target.resolve().is_relative_to(model_dir.resolve()):
        raise CommandFailed("invalid_spec", f"file name {name!r} leads outside the model")
    return target


class _Progress:
    """``model.downloadProgress`` frames, at most one per ``interval`` plus a last one."""

    def __init__(self, *, emit: Emit, model_id: str, files: list[ModelFile],
                 clock: Callable[[], float], interval: float) -> None:
        self.emit, self.model_id, self.clock, self.interval = emit, model_id, clock, interval
        sizes = [f.size for f in files]
        self.bytes_total = sum(s for s in sizes if s is not None) \
            if all(s is not None for s in sizes) else None
        self.files_total = len(files)
        self.bytes_done = self.files_done = 0
        self.command_id = CURRENT_COMMAND.get()
        self._last = clock()

    async def add(self, n: int, *, file_done: bool = False) -> None:
        self.bytes_done += n
        self.files_done += int(file_done)
        if self.clock() - self._last >= self.interval:
            await self.send()

    async def send(self) -> None:
        self._last = self.clock()
        frame = {"modelId": self.model_id, "bytesDone": self.bytes_done,
                 "bytesTotal": self.bytes_total, "filesDone": self.files_done,
                 "filesTotal": self.files_total}
        if self.command_id is not None:
            frame["commandId"] = self.command_id
        await self.emit("model.downloadProgress", frame)


class ModelHandlers:
    """``in_use``: the model folders the node's deployment servers were given (running or
    not, as long as their runtime still has them); a versioned download never removes
    those. Without it, only the versions the controller names in ``keep`` are spared.
    ``max_bytes``: the most the cache at ``root`` may hold (AIWM_NODE_MODEL_CACHE_MAX); a
    download that would pass it evicts, or is refused, as one that does not fit the disk."""

    def __init__(self, *, root: Path, emit: Emit,
                 in_use: Callable[[], Awaitable[set[Path]]] | None = None,
                 clock: Callable[[], float] = time.monotonic, progress_interval: float = 0.5,
                 free_space: Callable[[Path], int] | None = None,
                 max_bytes: int | None = None) -> None:
        self.root = root
        self.emit = emit
        self.in_use = in_use
        self.free_space = free_space or (lambda path: shutil.disk_usage(path).free)
        self.max_bytes = max_bytes
        # Room checks one at a time, and what the downloads under way still expect to
        # write (each a function of their progress), which a check counts as taken: two
        # downloads checked together cannot both take the same free bytes.
        self._room_lock = asyncio.Lock()
        self._expected: dict[int, Callable[[], int]] = {}
        self.clock = clock
        self.progress_interval = progress_interval
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._busy: Counter[str] = Counter()

    async def aclose(self) -> None:
        """Nothing to release: each download opens its own client in its worker thread."""

    async def download(self, data: dict[str, Any]) -> dict[str, Any]:
        arrived = time.time()
        request = parse(ModelDownloadData, data)
        model_dir = model_subdir(self.root, request.modelId, request.version)
        targets = [(f, file_target(model_dir, f.name)) for f in request.files]  # all, first
        for f, _ in targets:
            if not f.url.startswith(("http://", "https://")):
                raise CommandFailed("invalid_spec", f"{f.name}: only http(s) URLs can be fetched")
        async with self._model(request.modelId):  # one download per model at a time
            model_dir.mkdir(parents=True, exist_ok=True)
            progress = _Progress(emit=self.emit, model_id=request.modelId, files=request.files,
                                 clock=self.clock, interval=self.progress_interval)
            # Versions nothing uses go first: their room may be what this one needs.
            versions = await self._drop_versions(
                request.modelId, model_dir.parent, {request.version, *request.keep}) \
                if request.version is not None else []
            todo = []
            for f, path in targets:
                if await _cached(f, path):
                    await progress.add(path.stat().st_size, file_done=True)
                else:
                    todo.append((f, path))
            skipped = len(targets) - len(todo)
            # Partial files an agent that stopped mid-download left take room, and no later
            # download reuses them (each has a name of its own); none is being written now.
            paths = {path for _, path in targets}
            dropped = await _to_the_end(_drop_partials, model_dir, paths)
            async with self._room_lock:
                evicted = await self._make_room(request, model_dir, [f for f, _ in todo],
                                                arrived)
                need, start = sum(f.size or 0 for f, _ in todo), progress.bytes_done
                self._expected[id(progress)] = \
                    lambda: max(0, need - (progress.bytes_done - start))
            try:
                if todo:  # from the first byte on, the folder is no whole version
                    (model_dir / COMPLETE).unlink(missing_ok=True)
                for f, path in todo:
                    await self._fetch(f, path, progress)
            finally:
                del self._expected[id(progress)]
            await progress.send()
            total = sum(path.stat().st_size for _, path in targets)
            removed = dropped
            if request.version is not None:  # the folder holds that version, nothing else
                removed += await _to_the_end(
                    _prune, model_dir, paths | {model_dir / COMPLETE})
                (model_dir / COMPLETE).touch()
        log.info("model %s: %d file(s), %d byte(s), %d already here, %d left over removed%s",
                 request.modelId, len(targets), total, skipped, removed,
                 f"; version(s) {', '.join(versions)} removed" if versions else "")
        return {"modelId": request.modelId, "version": request.version, "path": str(model_dir),
                "files": len(targets), "bytes": total, "skipped": skipped, "removed": removed,
                "removedVersions": versions, "evicted": evicted}

    async def _make_room(self, request: ModelDownloadData, model_dir: Path,
                         files: list[ModelFile], arrived: float) -> list[str]:
        """``insufficient_storage`` before anything is fetched, when the files whose sizes
        are known would not fit on the disk of ``model_dir`` (the files they replace are
        deleted only after: not counted as free). With ``spare`` from the controller, other
        models' version folders it does not name and no server here was given are evicted
        first, the least recently downloaded first, until the files fit; never one that a
        download finished after this command arrived (``arrived``, wall clock: ``spare``
        was computed before), nor one of a model busy with a command of its own. Returns
        those evicted (``<modelId>/v<N>``)."""
        need = sum(f.size for f in files if f.size is not None)
        if not need:
            return []
        free, limit = await self._room(model_dir)
        evicted: list[str] = []
        if need > free and request.spare is not None:
            for folder in self._evictable(request, model_dir.parent, arrived):
                model = folder.parent.name
                if self._busy[model]:
                    continue  # a download, delete or prune of that model runs or waits
                if not await self._unused(request.modelId, folder):
                    continue
                if self._busy[model]:
                    continue  # one arrived while the runtimes were asked
                async with self._model(model):  # free, so taken at once
                    try:
                        await asyncio.to_thread(shutil.rmtree, folder)
                    except OSError as e:
                        log.warning("model %s: could not evict %s: %s", request.modelId, folder, e)
                        continue
                evicted.append(f"{model}/{folder.name}")
                free, limit = await self._room(model_dir)
                if need <= free:
                    break
        if evicted:
            log.warning("model %s: evicted %s from the cache to make room (%d bytes needed)",
                        request.modelId, ", ".join(evicted), need)
        if need > free:
            raise CommandFailed("insufficient_storage", (
                f"model {request.modelId}: {len(files)} file(s) to fetch need {need} bytes, and "
                + limit + (f", after evicting {', '.join(evicted)}" if evicted else "")
                + ": free space there or remove models with model.delete, then retry"))
        return evicted

    async def _room(self, model_dir: Path) -> tuple[int, str]:
        """How many more bytes the cache may take: its disk's free space, or less when
        ``max_bytes`` is closer (what the cache holds is counted, partial files too); and
        what limits it, in words for an error."""
        expected = sum(left() for left in self._expected.values())
        free = max(0, self.free_space(model_dir) - expected)
        busy = f", not counting {expected} bytes expected by downloads under way" \
            if expected else ""
        disk = f"{model_dir} has {free} free (AIWM_NODE_MODEL_DIR){busy}"
        if self.max_bytes is None:
            return free, disk
        _, held = await asyncio.to_thread(_tally, self.root)
        left = max(0, self.max_bytes - held - expected)
        if left >= free:
            return free, disk
        return left, (f"the model cache holds {held} bytes of the {self.max_bytes} it may "
                      f"(AIWM_NODE_MODEL_CACHE_MAX){busy}")

    def _evictable(self, request: ModelDownloadData, own: Path, arrived: float) -> list[Path]:
        """Other models' version folders ``spare`` does not name, least recently downloaded
        first (by their marker), leaving out any whose download finished after
        ``arrived``. Entries that cannot be read (lost+found, one removed meanwhile) are
        passed over."""
        spare = request.spare or {}
        own = own.resolve()
        found = []
        try:
            models = sorted(self.root.iterdir())
        except OSError:
            return []
        for model in models:
            try:
                if model.is_symlink() or not model.is_dir() or model.resolve() == own:
                    continue
                kept = {f"v{v}" for v in spare.get(model.name, [])}
                for entry in model.iterdir():
                    if is_version_dir(entry) and entry.name not in kept:
                        marker = entry / COMPLETE
                        when = (marker if marker.exists() else entry).stat().st_mtime
                        if when < arrived - 1:  # 1 s: coarse file system clocks
                            found.append((when, entry))
            except OSError:
                continue
        return [entry for _, entry in sorted(found)]

    async def _unused(self, model_id: str, folder: Path) -> bool:
        """Whether no server of the node's runtimes was given ``folder`` (asked anew before
        each eviction: a server may have started from it meanwhile); False when the
        runtimes cannot say."""
        used = await self._used(model_id, "nothing evicted")
        return used is not None and folder.resolve() not in used

    async def _used(self, model_id: str, consequence: str) -> set[Path] | None:
        """The folders the node's servers were given, resolved; None, with a warning
        saying ``consequence``, when the runtimes cannot say (Docker down)."""
        try:
            used = await self.in_use() if self.in_use is not None else set()
        except CommandFailed as e:
            log.warning("model %s: %s, since the deployments using the cache cannot be "
                        "listed: %s", model_id, consequence, e.message)
            return None
        return {p.resolve() for p in used}

    @contextlib.asynccontextmanager
    async def _model(self, model_id: str) -> AsyncIterator[None]:
        """One command on a model at a time; ``_busy`` counts those running or waiting, so
        eviction can pass a model over without waiting for it."""
        self._busy[model_id] += 1
        try:
            async with self._locks[model_id]:
                yield
        finally:
            self._busy[model_id] -= 1
            if not self._busy[model_id]:
                del self._busy[model_id]

    async def _drop_versions(self, model_id: str, model_dir: Path, versions: set[int]) -> list[str]:
        """Remove the model's version folders but those of ``versions`` and those a
        deployment on this node was given (before a download: their room may be what it
        needs; or asked by ``model.delete`` with ``keep``). If the runtimes cannot say
        which those are (Docker down), none is removed."""
        keep = {f"v{v}" for v in versions}
        used = await self._used(model_id, "other versions kept")
        dropped: list[str] = []
        if used is None or not model_dir.is_dir():
            return dropped
        for entry in sorted(model_dir.iterdir()):
            if is_version_dir(entry) and entry.name not in keep and entry.resolve() not in used:
                await asyncio.to_thread(shutil.rmtree, entry)
                dropped.append(entry.name)
        return dropped

    async def _fetch(self, f: ModelFile, path: Path, progress: _Progress) -> None:
        """Fetch one file to a partial name, check it, then give it its real name.

        The transfer runs in a worker thread with a blocking client: reading, hashing and
        writing there beat the event loop's async client by half again (bench/models.py);
        the loop only relays progress, and a cancel stops the thread at its next chunk."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        counter = [0]
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        transfer = loop.run_in_executor(None, _transfer, f, partial, counter, stop)
        reported = 0
        try:
            while True:
                done, _ = await asyncio.wait([transfer],
                                             timeout=max(self.progress_interval, 0.05))
                now = counter[0]  # read once: the thread moves it on while we report
                await progress.add(now - reported)
                reported = now
                if done:
                    break
            written, sha256 = transfer.result()
            if f.size is not None and written != f.size:
                raise CommandFailed("size_mismatch",
                                    f"{f.name}: got {written} bytes, expected {f.size}")
            if f.sha256 is not None and sha256 != f.sha256:
                raise CommandFailed("checksum_mismatch",
                                    f"{f.name}: sha256 is {sha256}, expected {f.sha256}")
            os.replace(partial, path)
            await progress.add(0, file_done=True)
        except httpx.HTTPError as e:
            raise CommandFailed("download_failed",
                                f"{f.name}: {type(e).__name__}: {e} ({f.url})") from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CommandFailed("insufficient_storage", (
                    f"{f.name}: the disk of {path.parent} filled up while it was written "
                    f"({e.strerror}); free space there (AIWM_NODE_MODEL_DIR) and retry")) from None
            raise
        finally:
            # Cancelled: the thread stops at its next chunk (not waited for: a stalled
            # server may hold its read for a while; it writes to the unlinked file).
            stop.set()
            partial.unlink(missing_ok=True)  # failed, cancelled, or already renamed

    async def delete(self, data: dict[str, Any]) -> dict[str, Any]:
        request = parse(ModelDeleteData, data)
        model_dir = model_subdir(self.root, request.modelId, request.version)
        async with self._model(request.modelId):
            existed = model_dir.is_dir()
            if existed:
                await asyncio.to_thread(shutil.rmtree, model_dir)
        return {"modelId": request.modelId, "version": request.version, "deleted": existed}


    async def prune(self, data: dict[str, Any]) -> dict[str, Any]:
        """``model.prune``: remove the model's version folders but those in ``keep`` and
        those a server here was given (a deploy's or a delete's tidy step sends it)."""
        request = parse(ModelPruneData, data)
        model_dir = model_subdir(self.root, request.modelId)
        async with self._model(request.modelId):
            dropped = await self._drop_versions(request.modelId, model_dir, set(request.keep))
        if dropped:
            log.info("model %s: version(s) %s removed", request.modelId, ", ".join(dropped))
        return {"modelId": request.modelId, "removedVersions": dropped}


SUMMARY_ENTRIES = 1000  # a metrics report lists at most this many (it must fit a frame)


def cache_summary(root: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """What the model cache at ``root`` holds, for the metrics report: ``{"models":
    [{modelId, version, files, bytes}], "modelDirFree", "modelCacheMax"}``, at most
    SUMMARY_ENTRIES of them (the largest). Partial files count (they take room); links
    are not followed; folders whose name no download would make are left out. Blocking:
    run it in a thread."""
    models: list[dict[str, Any]] = []
    try:
        model_dirs = sorted(p for p in root.iterdir()
                            if p.is_dir() and not p.is_symlink() and len(p.name) <= 100)
        free: int | None = shutil.disk_usage(root).free
    except FileNotFoundError:  # nothing downloaded yet
        return {"models": [], "modelDirFree": None, "modelCacheMax": max_bytes}
    for model_dir in model_dirs:
        loose = {"files": 0, "bytes": 0}  # files of downloads that named no version
        for entry in sorted(model_dir.iterdir(), key=lambda p: p.name):
            if is_version_dir(entry):
                files, size = _tally(entry)
                models.append({"modelId": model_dir.name, "version": int(entry.name[1:]),
                               "files": files, "bytes": size, "complete": complete(entry)})
            else:
                files, size = _tally(entry)
                loose["files"] += files
                loose["bytes"] += size
        if loose["files"]:
            models.append({"modelId": model_dir.name, "version": None, **loose,
                           "complete": None})
    if len(models) > SUMMARY_ENTRIES:
        largest = sorted(range(len(models)), key=lambda i: -models[i]["bytes"])
        models = [models[i] for i in sorted(largest[:SUMMARY_ENTRIES])]  # in folder order
    return {"models": models, "modelDirFree": free, "modelCacheMax": max_bytes}


def _tally(path: Path) -> tuple[int, int]:
    """Files and bytes under ``path`` (a file counts itself); links are not followed."""
    if path.is_symlink() or not path.is_dir():
        try:
            return (1, path.lstat().st_size) if not path.is_symlink() else (0, 0)
        except FileNotFoundError:
            return 0, 0
    files = size = 0
    for where, _, names in os.walk(path):
        for name in names:
            if name == COMPLETE and where == str(path):
                continue  # the agent's marker, not a model file
            try:
                st = os.lstat(os.path.join(where, name))
            except FileNotFoundError:
                continue  # removed while we looked
            files += 1
            size += st.st_size
    return files, size


PARTIAL = re.compile(r"\..+\.[0-9a-f]{8}\.part")  # a file being fetched: see _fetch


async def _to_the_end(work: Callable[..., int], *args: Any) -> int:
    """``work(*args)`` in a thread; a cancelled command still waits for it to end before
    it lets go of the model's lock, so that no walk of a model's folder outlives the
    lock and removes what the next command on that model writes there."""
    running = asyncio.ensure_future(asyncio.to_thread(work, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


def _drop_partials(model_dir: Path, files: set[Path]) -> int:
    """Remove the partial files under ``model_dir`` (not following links) but ``files``,
    the download's own (a model file may have a name like one); how many."""
    removed = 0
    for where, _, names in os.walk(model_dir):
        for name in names:
            if PARTIAL.fullmatch(name) and Path(where, name) not in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(where, name))
                    removed += 1
    return removed


def _prune(model_dir: Path, keep: set[Path]) -> int:
    """Remove from ``model_dir`` every file (or link) not in ``keep``, and the folders
    that leaves empty: the files of an earlier version that this one does not have (an
    old set of weight shards next to the new one would confuse a server), and partial
    files a stopped agent left. Links are removed, never followed. Returns how many."""
    removed = 0
    for folder, dirs, files in os.walk(model_dir, topdown=False):
        here = Path(folder)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            path = here / name
            if path not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        if here != model_dir and not any(here.iterdir()):
            here.rmdir()
    return removed


async def _cached(f: ModelFile, path: Path) -> bool:
    """Whether ``path`` already holds this file (only whole files have their real name)."""
    if not path.is_file():
        return False
    if f.size is not None and path.stat().st_size != f.size:
        return False
    if f.sha256 is not None:
        return await asyncio.to_thread(_sha256, path) == f.sha256
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Stopped(Exception):
    pass


BATCH = 2**20  # received bytes handed to the hashing thread at a time
QUEUED = 8  # batches that may wait for it
RESUMES = 5  # broken transfers in a row, each without a byte gained, before giving up
RESUME_DELAY = 0.5  # seconds before the first resume; doubled each time, at most 8


def _transfer(f: ModelFile, partial: Path, counter: list[int],
              stop: threading.Event) -> tuple[int, str]:
    """GET ``f.url`` into ``partial``, hashing as it goes (in a worker thread).

    A transfer that breaks off (connection reset or closed early, a read timeout) is
    resumed where it stopped, with ``Range: bytes=<written>-``, after a pause that doubles
    each time; :data:`RESUMES` breaks in a row that gained no byte end it with
    ``download_failed``. A server that answers a resume with the whole file (200) is read
    again from the start. The hash runs over the bytes as written, across resumes."""
    digest = hashlib.sha256()
    timeout = httpx.Timeout(60.0, connect=15.0)
    fruitless, delay = 0, RESUME_DELAY
    with httpx.Client(follow_redirects=True, timeout=timeout) as client, \
            open(partial, "wb") as out:
        while True:
            before = counter[0]
            try:
                digest = _receive(client, f, out, digest, counter, stop)
                break
            except httpx.TransportError as e:
                if stop.is_set():
                    raise _Stopped from None
                fruitless = 0 if counter[0] > before else fruitless + 1
                if fruitless >= RESUMES:
                    raise
                log.warning("%s: transfer broke off after %d bytes (%s: %s); resuming in "
                            "%.1f s", f.name, counter[0], type(e).__name__, e, delay)
                if stop.wait(delay):
                    raise _Stopped from None
                delay = min(delay * 2, 8.0)
    if stop.is_set():
        raise _Stopped
    return counter[0], digest.hexdigest()


def _receive(client: httpx.Client, f: ModelFile, out: BinaryIO, digest: Any,
             counter: list[int], stop: threading.Event) -> Any:
    """One GET, from byte ``counter[0]`` on; returns the digest (a new one when the server
    sent the whole file again).

    Receiving and hashing overlap: this thread reads the response and a second one hashes
    and writes what it read, about 1 MiB at a time (sha256 and file writes release the
    GIL, so on two cores the two run side by side; bench/models.py)."""
    offset = counter[0]
    # Raw bytes are the file's bytes only if nothing encodes them on the way.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", f.url, headers=headers) as response:
        if offset and response.status_code == 200:  # Range not honoured: from the start
            out.seek(0)
            out.truncate()
            digest, counter[0] = hashlib.sha256(), 0
        elif offset and response.status_code == 206:
            start = response.headers.get("content-range", "").removeprefix("bytes ")
            if not start.startswith(f"{offset}-"):
                raise CommandFailed("download_failed", f"{f.name}: {f.url} answered a resume "
                                    f"from byte {offset} with the range {start!r}")
        elif response.status_code != 200:
            raise CommandFailed("download_failed",
                                f"{f.name}: {f.url} answered {response.status_code}")
        batches: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUED)
        failed: list[BaseException] = []

        def hash_and_write() -> None:
            try:
                while (batch := batches.get()) is not None:
                    digest.update(batch)
                    out.write(batch)
                    counter[0] += len(batch)
            except BaseException as e:  # noqa: BLE001 - reported by the receiving thread
                failed.append(e)
                stop.set()
                while batches.get() is not None:  # let the receiver finish its puts
                    pass

        writer = threading.Thread(target=hash_and_write, daemon=True)
        writer.start()
        pending: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_raw():
                if stop.is_set():
                    raise _Stopped
                pending.append(chunk)
                size += len(chunk)
                if size >= BATCH:
                    batches.put(b"".join(pending))
                    pending, size = [], 0
        finally:
            # What arrived before a break is kept: the resume asks for what follows it.
            if pending:
                batches.put(b"".join(pending))
            batches.put(None)
            writer.join()
            if failed:  # the hashing side's error (e.g. a full disk), not _Stopped
                raise failed[0]
    return digest

"""Streaming ``multipart/form-data`` uploads: files go to disk as they arrive.

Feed the request body chunk by chunk to :class:`UploadParser`; each file part is written
to a staging directory while its sha256 and size are computed, so no file is ever held
whole in memory. Text fields (``modelId``) are kept, small and bounded. Names are
checked with :func:`safe_name`: a part may name a file in a subfolder, never outside.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import mmap
import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from aiwm.errors import InsufficientStorage, PayloadTooLarge, ValidationFailed

MAX_FIELD_BYTES = 4096
MAX_NAME = 500
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def safe_name(raw: str) -> str:
    """A file name from a client as a safe relative path (``a/b.bin``), or ValidationFailed.

    Windows separators count as separators; leading slashes are dropped; ``.``/``..``
    segments and control characters are refused rather than silently rewritten."""
    name = raw.replace("\\", "/").strip()
    while name.startswith("/"):
        name = name[1:]
    parts = [p for p in name.split("/") if p != ""]
    problem = None
    if not parts:
        problem = "a file needs a name"
    elif any(p in (".", "..") for p in parts):
        problem = f"file name {raw!r} leaves its folder"
    elif _BAD_CHARS.search(name):
        problem = f"file name {raw!r} has control characters"
    elif len(name) > MAX_NAME:
        problem = f"file name is longer than {MAX_NAME} characters"
    elif re.match(r"^[A-Za-z]:$", parts[0]):
        problem = f"file name {raw!r} is an absolute Windows path"
    if problem:
        raise ValidationFailed(problem, extra={"errors": [
            {"field": "body.file", "message": problem, "type": "invalid_name"}]})
    return "/".join(parts)


@dataclass
class UploadedFile:
    name: str
    path: Path
    size: int = 0
    sha256: str = ""


class _Writer:
    """Writes one file part to disk while a worker thread hashes it and another writes it.

    The parser copies each piece of the body into a batch buffer of ``BATCH`` bytes; a full
    batch goes to both workers at once (hashlib and file writes release the GIL, so parsing,
    hashing and writing overlap). The buffers are made once per file, at most ``BUFFERS``
    of them, and reused once both workers are done with one: no allocation per batch.
    When none is free, :meth:`add` waits for the oldest (bounded memory); :meth:`room`
    does that wait without blocking an event loop. One large batch costs each worker one
    GIL hand-over: handing over the body's own smaller pieces instead, uncopied, was
    slower (each piece its own hash update, and the copy for O_DIRECT held the GIL).

    With ``direct`` (the default where the file system allows it) the file is written with
    O_DIRECT: the disk reads the batches straight from the buffers (page-aligned ``mmap``
    memory), and the page cache is neither filled nor copied into. On the VMs AIWM is
    tested on, buffered writes of a 500 MB file cost 0.2-3.5 CPU-seconds per GB (fresh
    page-cache pages are slow to come by there) against 0.05-0.1 with O_DIRECT, which also
    leaves the store's fsync nothing to wait for. The tail that is not a whole number of
    ``ALIGN`` blocks is written buffered, and a file system that refuses O_DIRECT
    (EINVAL) gets buffered writes throughout.
    """

    BATCH = 1024 * 1024
    BUFFERS = 8
    ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of the logical block size
    # Buffered writes only: every this many bytes written, the kernel is asked to start
    # writing them to disk (posix_fadvise DONTNEED starts writeback without waiting for
    # it), so the store's fsync at the end has only the tail left to wait for.
    WRITEBACK = 32 * 1024 * 1024

    def __init__(self, file: UploadedFile, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
                 *, direct: bool = True) -> None:
        self.file = file
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._direct = direct and hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(file.path, flags | (os.O_DIRECT if self._direct else 0), 0o666)
        except OSError as e:
            if not self._direct or e.errno != errno.EINVAL:
                raise
            self._direct = False
            self._fd = os.open(file.path, flags, 0o666)
        self._digest = hashlib.sha256()
        self._hasher, self._writer = pools  # one thread each: batches stay in order
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._batch: memoryview | None = None
        self._fill = 0
        self._in_flight: deque[tuple[mmap.mmap, Future[None], Future[None]]] = deque()
        self._written = 0
        self._flushed = 0
        self.closed = False  # every byte handed over; finish() or wait_closed() completes

    @property
    def direct(self) -> bool:
        """Whether the file is (still) written with O_DIRECT."""
        return self._direct

    def add(self, piece: memoryview) -> None:
        while piece:
            if self._batch is None:
                self._batch = memoryview(self._take())
            n = min(self.BATCH - self._fill, len(piece))
            self._batch[self._fill:self._fill + n] = piece[:n]
            self._fill += n
            piece = piece[n:]
            if self._fill == self.BATCH:
                self._hand_over()

    def _take(self) -> mmap.mmap:
        self._reclaim()
        if self._free:
            return self._free.pop()
        if self._made < self.BUFFERS:
            self._made += 1
            return mmap.mmap(-1, self.BATCH)  # anonymous memory: page-aligned, as O_DIRECT needs
        buffer, hashed, written = self._in_flight.popleft()  # all busy: wait for the oldest
        hashed.result()
        written.result()
        return buffer

    def _reclaim(self) -> None:
        while self._in_flight and self._in_flight[0][1].done() and self._in_flight[0][2].done():
            buffer, hashed, written = self._in_flight.popleft()
            hashed.result()  # a worker's error surfaces here
            written.result()
            self._free.append(buffer)

    def _hand_over(self) -> None:
        assert self._batch is not None
        buffer = self._batch.obj
        assert isinstance(buffer, mmap.mmap)
        view = self._batch[:self._fill]
        self._in_flight.append((buffer, self._hasher.submit(self._digest.update, view),
                                self._writer.submit(self._write, view)))
        self._batch, self._fill = None, 0

    # -- the write thread ----------------------------------------------------------------

    def _write(self, view: memoryview) -> None:
        try:
            if self._direct and len(view) % self.ALIGN:
                whole = len(view) - len(view) % self.ALIGN
                self._write_all(view[:whole])
                self._stop_direct()  # the tail: O_DIRECT writes only whole blocks
                view = view[whole:]
            self._write_all(view)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage(
                    f"no space left for {self.file.name!r} on the server's disk "
                    "(AIWM_HOME)") from e
            raise
        if not self._direct and self._written - self._flushed >= self.WRITEBACK \
                and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._flushed, self._written - self._flushed,
                             os.POSIX_FADV_DONTNEED)
            self._flushed = self._written

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._stop_direct()  # this file system takes no direct I/O after all
                continue
            self._written += n
            view = view[n:]

    def _stop_direct(self) -> None:
        if self._direct:
            fcntl.fcntl(self._fd, fcntl.F_SETFL,
                        fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._direct = False

    # -- the event loop's side -----------------------------------------------------------

    def free_buffers(self) -> int:
        self._reclaim()
        return len(self._free) + self.BUFFERS - self._made

    async def room(self, buffers: int) -> None:
        """Wait, without blocking the event loop, until ``buffers`` buffers are free."""
        while self.free_buffers() < buffers and self._in_flight:
            _, hashed, written = self._in_flight[0]
            await asyncio.wait([asyncio.wrap_future(hashed), asyncio.wrap_future(written)])

    def close(self) -> None:
        """Hand over what is left; :meth:`finish` or :meth:`wait_closed` then completes."""
        if self._fill:
            self._hand_over()
        self.closed = True

    async def wait_closed(self) -> None:
        """Wait until every byte is hashed and written; then set the file's sha256."""
        self.close()
        await self.room(self.BUFFERS)
        self.finish()

    def finish(self) -> None:
        """Wait for the workers (blocking), close the file, set the file's sha256."""
        self.close()
        try:
            while self._in_flight:
                _, hashed, written = self._in_flight.popleft()
                hashed.result()
                written.result()
        finally:
            self._close_fd()
        self.file.sha256 = self._digest.hexdigest()

    def abort(self) -> None:
        for _, hashed, written in self._in_flight:
            hashed.cancel()
            written.cancel()
        wait([f for _, hashed, written in self._in_flight for f in (hashed, written)])
        self._in_flight.clear()
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    field_name: str = ""
    file: UploadedFile | None = None
    writer: _Writer | None = None
    text: bytearray = field(default_factory=bytearray)


class UploadParser:
    """Parse one multipart body; files land in ``staging`` as they stream in."""

    def __init__(self, content_type: str, *, staging: Path, max_file_bytes: int,
                 max_files: int = 1000, direct_io: bool = True) -> None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise ValidationFailed("send multipart/form-data with a boundary", extra={"errors": [
                {"field": "header.content-type", "message": "multipart/form-data expected",
                 "type": "content_type"}]})
        self.staging = staging
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.direct_io = direct_io  # write files with O_DIRECT where the file system allows
        self.fields: dict[str, str] = {}
        self.files: list[UploadedFile] = []
        self._part: _Part | None = None
        self._closing: list[_Writer] = []  # files whose last bytes are still being written
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._error: Exception | None = None
        self._pools = (ThreadPoolExecutor(1, thread_name_prefix="upload-hash"),
                       ThreadPoolExecutor(1, thread_name_prefix="upload-write"))
        self._parser = MultipartParser(boundary, callbacks={  # type: ignore[arg-type]
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._hfield, "on_header_value": self._hvalue,
            "on_header_end": self._hend, "on_headers_finished": self._headers_done})

    def feed(self, chunk: bytes) -> None:
        """Parse the next piece of the body. Blocks only while a file's buffers are all
        busy: a caller on an event loop awaits :meth:`drain` after each piece instead."""
        self._parser.write(chunk)
        if self._error is not None:
            raise self._error

    async def drain(self) -> None:
        """Wait, without blocking the event loop, until the next piece can be fed without
        blocking: the open file has buffers free, and every finished file is on disk
        and hashed (its ``sha256`` is set)."""
        try:
            while self._closing:
                await self._closing[0].wait_closed()
                self._closing.pop(0)
            part = self._part
            if part is not None and part.writer is not None:
                await part.writer.room(_Writer.BUFFERS // 2)
        except Exception as e:  # a worker's error: disk full, I/O error
            self._error = self._error or e
            raise

    def finish(self) -> None:
        """The body is complete: check it ended well, and wait until every file is on disk
        and hashed (blocking; at once after :meth:`drain`)."""
        self._parser.finalize()
        if self._error is not None:
            raise self._error
        if self._part is not None:
            raise ValidationFailed("the multipart body ended in the middle of a part")
        while self._closing:
            self._closing[0].finish()
            self._closing.pop(0)

    def close(self) -> None:
        """Close any file still open (after an error) and stop the worker threads."""
        writers = list(self._closing)
        if self._part is not None and self._part.writer is not None:
            writers.append(self._part.writer)
        for writer in writers:
            writer.abort()
        self._closing.clear()
        for pool in self._pools:
            pool.shutdown(wait=True)

    # --- callbacks (python-multipart calls them synchronously from write) ---------------

    def _begin(self) -> None:
        self._part = _Part()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _hend(self) -> None:
        if self._part is not None:
            self._part.headers[bytes(self._header_field).lower().decode("latin-1")] = \
                bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_done(self) -> None:
        part = self._part
        if part is None or self._error is not None:
            return
        _, params = parse_options_header(part.headers.get("content-disposition", b""))
        part.field_name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if filename is None:
            return
        try:
            if part.field_name != "file":
                raise ValidationFailed(f"files go in 'file' parts, not {part.field_name!r}",
                                       extra={"errors": [{"field": f"body.{part.field_name}",
                                                          "message": "not a file field",
                                                          "type": "unexpected_file"}]})
            if len(self.files) >= self.max_files:
                raise ValidationFailed(f"at most {self.max_files} files in one upload")
            name = safe_name(filename.decode("utf-8", "replace"))
            if any(f.name == name for f in self.files):
                raise ValidationFailed(f"file {name!r} appears twice in the upload")
        except ValidationFailed as e:
            self._error = e
            return
        path = self.staging / f"part-{len(self.files)}"
        part.file = UploadedFile(name=name, path=path)
        part.writer = _Writer(part.file, self._pools, direct=self.direct_io)
        self.files.append(part.file)

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or self._error is not None:
            return
        piece = memoryview(data)[start:end]  # no copy until the writer batches it
        if part.file is None:
            part.text += piece
            if len(part.text) > MAX_FIELD_BYTES:
                self._error = ValidationFailed(f"form field {part.field_name!r} is too long")
            return
        part.file.size += len(piece)
        if part.file.size > self.max_file_bytes:
            self._error = PayloadTooLarge(
                f"file {part.file.name!r} is over the {self.max_file_bytes}-byte limit "
                "(AIWM_MAX_UPLOAD_BYTES)")
            return
        assert part.writer is not None
        try:
            part.writer.add(piece)
        except Exception as e:  # a worker's error: disk full, I/O error
            self._error = e

    def _end(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        if part.file is not None and part.writer is not None:
            part.writer.close()  # drain() or finish() waits for it and sets the sha256
            self._closing.append(part.writer)
            part.writer = None
        elif part.file is None and part.field_name:
            self.fields[part.field_name] = part.text.decode("utf-8", "replace")

"""Streaming ``multipart/form-data`` uploads: files go to disk as they arrive.

Feed the request body chunk by chunk to :class:`UploadParser`; each file part is written
to a staging directory while its sha256 and size are computed, so no file is ever held
whole in memory. Text fields (``modelId``) are kept, small and bounded. Names are
checked with :func:`safe_name`: a part may name a file in a subfolder, never outside.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header

from aiwm.errors import PayloadTooLarge, ValidationFailed

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
    """Hashes one file's bytes in one worker thread and writes them in another, so that
    parsing the next piece of the body, hashing and writing all overlap (hashlib and file
    writes release the GIL). Bytes are handed over in batches of about 1 MiB, at most a
    few batches ahead."""

    BATCH = 1024 * 1024
    AHEAD = 4
    # Every this many bytes written, the kernel is asked to start writing them to disk
    # (posix_fadvise DONTNEED starts writeback without waiting for it), so the store's
    # fsync at the end has only the tail left to wait for, instead of the whole file.
    WRITEBACK = 32 * 1024 * 1024

    def __init__(self, path: Path, pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor]) -> None:
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in finish/abort
        self._digest = hashlib.sha256()
        self._buffer = bytearray()
        self._pending: deque[Future[None]] = deque()
        self._hasher, self._writer = pools  # one thread each: batches stay in order
        self._written = 0
        self._flushed = 0

    def add(self, piece: memoryview) -> None:
        self._buffer += piece
        if len(self._buffer) >= self.BATCH:
            self._hand_over()

    def _hand_over(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        while len(self._pending) >= 2 * self.AHEAD:
            self._pending.popleft().result()  # the workers are behind: wait (bounded memory)
        self._pending.append(self._hasher.submit(self._digest.update, data))
        self._pending.append(self._writer.submit(self._write, data))

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._written += len(data)
        if self._written - self._flushed >= self.WRITEBACK and hasattr(os, "posix_fadvise"):
            self._file.flush()
            os.posix_fadvise(self._file.fileno(), self._flushed, self._written - self._flushed,
                             os.POSIX_FADV_DONTNEED)
            self._flushed = self._written

    def finish(self) -> str:
        """Write what is left, close the file; the sha256 of everything written."""
        if self._buffer:
            self._hand_over()
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._file.close()
        return self._digest.hexdigest()

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        wait(list(self._pending))
        self._pending.clear()
        self._file.close()


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
                 max_files: int = 1000) -> None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise ValidationFailed("send multipart/form-data with a boundary", extra={"errors": [
                {"field": "header.content-type", "message": "multipart/form-data expected",
                 "type": "content_type"}]})
        self.staging = staging
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.fields: dict[str, str] = {}
        self.files: list[UploadedFile] = []
        self._part: _Part | None = None
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
        self._parser.write(chunk)
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self._parser.finalize()
        if self._error is not None:
            raise self._error
        if self._part is not None:
            raise ValidationFailed("the multipart body ended in the middle of a part")

    def close(self) -> None:
        """Close any file still open (after an error) and stop the worker threads."""
        if self._part is not None and self._part.writer is not None:
            self._part.writer.abort()
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
        part.writer = _Writer(path, self._pools)
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
        part.writer.add(piece)

    def _end(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        if part.file is not None and part.writer is not None:
            part.file.sha256 = part.writer.finish()
            part.writer = None
        elif part.file is None and part.field_name:
            self.fields[part.field_name] = part.text.decode("utf-8", "replace")

"""The streaming multipart parser and file-name checks (pure; real temp files)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aiwm.errors import InsufficientStorage, PayloadTooLarge, ValidationFailed
from aiwm.uploads import UploadedFile, UploadParser, _Writer, safe_name

BOUNDARY = "----aiwm-test-boundary"


def body(fields: dict[str, str], files: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for name, value in fields.items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                f"{value}\r\n").encode()
    for filename, data in files:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def parse(raw: bytes, tmp_path: Path, chunk: int = 7, limit: int = 10**9) -> UploadParser:
    parser = UploadParser(f"multipart/form-data; boundary={BOUNDARY}", staging=tmp_path,
                          max_file_bytes=limit)
    for i in range(0, len(raw), chunk):  # small chunks: boundaries fall anywhere
        parser.feed(raw[i:i + chunk])
    parser.finish()
    return parser


def test_files_stream_to_disk_with_size_and_sha256(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 1000
    parser = parse(body({"modelId": "mdl-1"}, [("config.json", b'{"a": 1}'),
                                               ("sub/model.bin", weights)]), tmp_path)
    assert parser.fields == {"modelId": "mdl-1"}
    names = [f.name for f in parser.files]
    assert names == ["config.json", "sub/model.bin"]
    big = parser.files[1]
    assert big.size == len(weights) and big.sha256 == hashlib.sha256(weights).hexdigest()
    assert big.path.read_bytes() == weights and big.path.parent == tmp_path


@pytest.mark.parametrize("raw, expected", [
    ("model.bin", "model.bin"), ("/abs/x.bin", "abs/x.bin"), ("a\\b\\c.bin", "a/b/c.bin"),
    ("dir//x", "dir/x"),
])
def test_safe_names(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "/", "../etc/passwd", "a/../../b", "./x", "C:\\x\\y",
                                 "bad\x00name", "x" * 501])
def test_unsafe_names_are_refused(raw: str) -> None:
    with pytest.raises(ValidationFailed):
        safe_name(raw)


def test_traversal_in_an_upload_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="leaves its folder"):
        parse(body({"modelId": "m"}, [("../../evil", b"x")]), tmp_path)
    assert not (tmp_path.parent.parent / "evil").exists()


def test_a_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge):
        parse(body({"modelId": "m"}, [("big.bin", b"x" * 1000)]), tmp_path, limit=999)


def test_duplicate_names_and_wrong_content_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="twice"):
        parse(body({}, [("a.bin", b"1"), ("a.bin", b"2")]), tmp_path)
    with pytest.raises(ValidationFailed, match="multipart"):
        UploadParser("application/json", staging=tmp_path, max_file_bytes=10)


def test_a_truncated_body_is_an_error(tmp_path: Path) -> None:
    raw = body({"modelId": "m"}, [("a.bin", b"123456")])
    parser = UploadParser(f"multipart/form-data; boundary={BOUNDARY}", staging=tmp_path,
                          max_file_bytes=100)
    parser.feed(raw[: len(raw) // 2 + 40])
    with pytest.raises(ValidationFailed):
        parser.finish()
    parser.close()


# -- the writer: O_DIRECT, buffers, backpressure, errors -------------------------------

def parser_for(tmp_path: Path, **options: object) -> UploadParser:
    return UploadParser(f"multipart/form-data; boundary={BOUNDARY}", staging=tmp_path,
                        max_file_bytes=10**9, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, _Writer.BATCH,
                                  3 * _Writer.BATCH + 12345,
                                  (_Writer.BUFFERS + 3) * _Writer.BATCH])
@pytest.mark.parametrize("chunk", [7919, 256 * 1024])
def test_files_of_every_size_land_whole(tmp_path: Path, size: int, chunk: int) -> None:
    """Whole batches go to disk with O_DIRECT and the unaligned tail buffered; more batches
    than buffers makes the writer reuse them."""
    data = os.urandom(size)
    parser = parse(body({"modelId": "m"}, [("w.bin", data)]), tmp_path, chunk=chunk)
    stored = parser.files[0]
    assert stored.size == size and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.path.read_bytes() == data
    parser.close()


def test_o_direct_is_used_where_the_file_system_allows_it(tmp_path: Path) -> None:
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        supported = True
    except OSError:
        supported = False  # then the writer falls back, as the next test checks
    writer = _Writer(UploadedFile("a", tmp_path / "a"), _pools())
    assert writer.direct == supported
    writer.add(memoryview(b"x" * (2 * _Writer.BATCH)))
    writer.finish()
    assert writer.direct == supported  # whole batches only: no switch to buffered
    assert (tmp_path / "a").read_bytes() == b"x" * (2 * _Writer.BATCH)


def test_a_file_system_that_refuses_o_direct_gets_buffered_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def refusing(fd: int, data: bytes) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    data = os.urandom(3 * _Writer.BATCH + 77)
    parser = parse(body({"modelId": "m"}, [("w.bin", data)]), tmp_path, chunk=65536)
    assert parser.files[0].path.read_bytes() == data
    assert parser.files[0].sha256 == hashlib.sha256(data).hexdigest()
    parser.close()


def test_buffered_writes_when_direct_io_is_off(tmp_path: Path) -> None:
    data = os.urandom(2 * _Writer.BATCH + 5)
    parser = parser_for(tmp_path, direct_io=False)
    raw = body({"modelId": "m"}, [("w.bin", data)])
    parser.feed(raw[:-1000])
    assert parser._part is not None and parser._part.writer is not None
    assert not parser._part.writer.direct
    parser.feed(raw[-1000:])
    parser.finish()
    assert parser.files[0].path.read_bytes() == data
    parser.close()


def test_a_full_disk_is_insufficient_storage_and_nothing_is_left_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = 0
    real_write = os.write

    def filling(fd: int, data: bytes) -> int:
        nonlocal written
        if written >= 2 * _Writer.BATCH:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling)
    raw = body({"modelId": "m"}, [("w.bin", os.urandom(6 * _Writer.BATCH))])
    parser = parser_for(tmp_path)
    with pytest.raises(InsufficientStorage, match="no space left"):
        for i in range(0, len(raw), 65536):
            parser.feed(raw[i:i + 65536])
        parser.finish()
    parser.close()
    assert InsufficientStorage.status == 507 and InsufficientStorage.retryable


def test_drain_waits_for_a_slow_disk_without_blocking_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_write_all = _Writer._write_all

    def slow(self: _Writer, view: memoryview) -> None:
        gate.wait(10)
        real_write_all(self, view)

    monkeypatch.setattr(_Writer, "_write_all", slow)
    data = os.urandom(_Writer.BUFFERS * _Writer.BATCH)
    raw = body({"modelId": "m"}, [("w.bin", data)])

    async def run() -> int:
        parser = parser_for(tmp_path)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, gate.set)  # the disk comes back after 0.3 s
        started = loop.time()
        for i in range(0, len(raw), 256 * 1024):
            parser.feed(raw[i:i + 256 * 1024])
            await parser.drain()  # never lets more than BUFFERS/2 batches pile up
        waited = loop.time() - started
        parser.finish()
        task.cancel()
        assert parser.files[0].path.read_bytes() == data
        parser.close()
        assert waited >= 0.25  # drain did wait for the disk ...
        return ticks

    assert asyncio.run(run()) >= 10  # ... and the loop kept running meanwhile


def _pools() -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    return ThreadPoolExecutor(1), ThreadPoolExecutor(1)

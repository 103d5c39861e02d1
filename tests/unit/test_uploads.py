"""The streaming multipart parser and file-name checks (pure; real temp files)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aiwm.errors import PayloadTooLarge, ValidationFailed
from aiwm.uploads import UploadParser, safe_name

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

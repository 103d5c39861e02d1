"""What only the local store and its file route do."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aiwm.errors import AlreadyExists
from aiwm.objectstore import LocalStore
from serve import files, problems
from tests.objectstore.conftest import SECRET, FileServer


async def put_bytes(store: LocalStore, key: str, data: bytes, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    await store.put_file(key, src)


async def test_url_shape(file_server: FileServer, prefix: str) -> None:
    store = LocalStore(root=file_server.store.root, public_url="https://aiwm.example/", secret=SECRET,
                       clock=lambda: 1_800_000_000.7)
    url = await store.url(prefix + "a b.bin", expires_in=600, filename="a b.bin")
    assert url.startswith(f"https://aiwm.example/api/files/{prefix}a%20b.bin?expires=1800000600&sig=")
    assert url.endswith("&filename=a+b.bin")


async def test_head_and_etag(file_server: FileServer, prefix: str, tmp_path: Path) -> None:
    data = b"0123456789" * 1000
    await put_bytes(file_server.store, prefix + "h.bin", data, tmp_path)
    url = await file_server.store.url(prefix + "h.bin", expires_in=60)
    async with httpx.AsyncClient() as client:
        head = await client.head(url)
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == str(len(data))
        assert head.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        past_end = await client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert past_end.status_code == 416
        middle = await client.get(url, headers={"Range": "bytes=10-19"})
        assert (middle.status_code, middle.content) == (206, data[10:20])


@pytest.mark.parametrize("query", ["", "?expires=1800000000", "?sig=abc", "?expires=soon&sig=abc"])
async def test_unsigned_requests_are_refused(file_server: FileServer, prefix: str, query: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{file_server.base_url}/api/files/{prefix}x.bin{query}")
    assert response.status_code == 403
    assert response.json()["code"] == "signature_invalid"


async def test_a_good_signature_for_a_missing_object_is_404(file_server: FileServer, prefix: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(await file_server.store.url(prefix + "none.bin", expires_in=60))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


def test_the_route_needs_a_local_store() -> None:
    app = FastAPI()
    problems.install(app)
    app.include_router(files.router, prefix="/api")
    response = TestClient(app).get("/api/files/models/a/b/v1/x.bin?expires=1&sig=ab")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a duplicate operation id for GET and HEAD
        assert list(app.openapi()["paths"]["/api/files/{key}"]) == ["get"]


async def test_stat_survives_lost_or_stale_metadata(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "objects", public_url="http://x", secret=SECRET)
    await store.ensure_ready()
    key = "models/o/m/v1/w.bin"
    await put_bytes(store, key, b"first", tmp_path)
    meta = tmp_path / "objects" / "meta" / f"{key}.json"
    meta.unlink()
    assert (await store.stat(key)).sha256 == hashlib.sha256(b"first").hexdigest()  # type: ignore[union-attr]
    assert meta.exists(), "the hash is written back"
    # A stale record (another file's) is never believed.
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "ino": 1, "sha256": "0" * 64}))
    assert (await store.stat(key)).sha256 == hashlib.sha256(b"first").hexdigest()  # type: ignore[union-attr]


async def test_moving_a_file_renames_it(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "objects", public_url="http://x", secret=SECRET)
    src = tmp_path / "upload.tmp"
    src.write_bytes(b"m" * 4096)
    inode = src.stat().st_ino
    stored = await store.put_file("models/o/m/v1/m.bin", src, move=True)
    assert not src.exists()
    assert (tmp_path / "objects" / "data" / stored.key).stat().st_ino == inode, "no copy was made"
    assert os.listdir(tmp_path / "objects" / "tmp") == []


async def test_failures_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "objects", public_url="http://x", secret=SECRET)
    await put_bytes(store, "models/o/m/v1/a", b"a", tmp_path)
    with pytest.raises(AlreadyExists):  # "a" is a file, so it cannot also be a folder
        await put_bytes(store, "models/o/m/v1/a/b", b"b", tmp_path)
    with pytest.raises(FileNotFoundError):
        await store.put_file("models/o/m/v1/c", tmp_path / "missing")
    src = tmp_path / "kept.bin"
    src.write_bytes(b"kept")
    with pytest.raises(AlreadyExists):
        await store.put_file("models/o/m/v1/a/d", src, move=True)
    assert src.read_bytes() == b"kept", "a failed move gives the file back"
    assert os.listdir(tmp_path / "objects" / "tmp") == []


async def test_delete_prunes_empty_folders(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "objects", public_url="http://x", secret=SECRET)
    await put_bytes(store, "models/o/m/v1/deep/er/x.bin", b"x", tmp_path)
    await store.delete("models/o/m/v1/deep/er/x.bin")
    assert not (tmp_path / "objects" / "data" / "models" / "o" / "m" / "v1" / "deep").exists()
    await put_bytes(store, "models/o/m/v2/x.bin", b"x", tmp_path)
    await store.delete_prefix("models/o/m/v2/")
    assert os.listdir(tmp_path / "objects" / "data") == []
    assert os.listdir(tmp_path / "objects" / "meta") == []


async def test_ensure_ready_is_idempotent(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "objects", public_url="http://x", secret=SECRET)
    await store.ensure_ready()
    await store.ensure_ready()
    assert sorted(os.listdir(tmp_path / "objects")) == ["data", "meta", "tmp"]


async def test_urls_from_another_secret_are_refused(file_server: FileServer, prefix: str,
                                                    tmp_path: Path) -> None:
    await put_bytes(file_server.store, prefix + "s.bin", b"s", tmp_path)
    other = LocalStore(root=file_server.store.root, public_url=file_server.base_url,
                       secret="a-different-jwt-secret", clock=time.time)
    async with httpx.AsyncClient() as client:
        response = await client.get(await other.url(prefix + "s.bin", expires_in=60))
    assert response.status_code == 403

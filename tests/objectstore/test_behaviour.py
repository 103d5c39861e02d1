"""The same behaviour from both stores, fetched over real HTTP: from the API's file
route (local) or through presigned URLs checked like S3 in front of moto (s3)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from aiwm.errors import Unavailable, ValidationFailed
from aiwm.objectstore import LocalStore
from tests.objectstore.conftest import Backend


def with_param(url: str, name: str, change: str) -> str:
    """``url`` with query parameter ``name`` altered: one character flipped ("flip") or
    its number raised by one ("bump")."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    out = []
    for k, v in query:
        if k == name:
            v = str(int(v) + 1) if change == "bump" else v[:-1] + ("0" if v[-1] != "0" else "1")
        out.append((k, v))
    assert dict(out) != dict(query), f"{name} not in {url}"
    return urlunsplit(parts._replace(query=urlencode(out, quote_via=quote, safe="")))


async def fetch(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url, headers=headers)


def assert_refused(response: httpx.Response, backend: Backend, code: str) -> None:
    assert response.status_code == 403, response.text
    if backend.name == "local":
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == code


async def test_put_stat_and_fetch(backend: Backend, prefix: str, payload: tuple[Path, bytes]) -> None:
    path, data = payload
    key = prefix + "sub dir/ünï weights.bin"
    stored = await backend.store.put_file(key, path)
    assert (stored.key, stored.size, stored.sha256) == (key, len(data), hashlib.sha256(data).hexdigest())
    assert path.exists(), "put_file without move leaves the source alone"
    assert await backend.store.stat(key) == stored

    response = await fetch(await backend.store.url(key, expires_in=60))
    assert response.status_code == 200, response.text
    assert response.headers["content-length"] == str(len(data))
    assert response.content == data


async def test_put_replaces_and_move_consumes(backend: Backend, prefix: str, tmp_path: Path) -> None:
    key = prefix + "config.json"
    first = tmp_path / "first.json"
    first.write_text('{"v": 1}')
    await backend.store.put_file(key, first)
    second = tmp_path / "second.json"
    second.write_text('{"v": 2, "longer": true}')
    stored = await backend.store.put_file(key, second, move=True)
    assert not second.exists()
    assert stored.size == len('{"v": 2, "longer": true}')
    assert await backend.store.stat(key) == stored
    assert (await fetch(await backend.store.url(key, expires_in=60))).content == b'{"v": 2, "longer": true}'


async def test_stat_of_a_missing_object_is_none(backend: Backend, prefix: str) -> None:
    assert await backend.store.stat(prefix + "nothing.bin") is None


async def test_a_missing_object_answers_404(backend: Backend, prefix: str) -> None:
    response = await fetch(await backend.store.url(prefix + "nothing.bin", expires_in=60))
    assert response.status_code == 404


@pytest.mark.parametrize("part", ["signature", "expiry", "key"])
async def test_an_altered_url_is_refused(backend: Backend, prefix: str, tmp_path: Path, part: str) -> None:
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(name.encode() * 100)
        await backend.store.put_file(prefix + name, tmp_path / name)
    url = await backend.store.url(prefix + "a.bin", expires_in=60)
    assert (await fetch(url)).status_code == 200
    if part == "signature":
        altered = with_param(url, backend.sig_param, "flip")
    elif part == "expiry":
        altered = with_param(url, backend.expires_param, "bump")
    else:
        altered = url.replace("/a.bin?", "/b.bin?")  # an object that exists, under another name
        assert altered != url
    assert_refused(await fetch(altered), backend, "signature_invalid")


async def test_an_expired_url_is_refused(backend: Backend, prefix: str, tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"x" * 1000)
    await backend.store.put_file(prefix + "x.bin", tmp_path / "x.bin")
    an_hour_ago = backend.make(lambda: time.time() - 3600)
    url = await an_hour_ago.url(prefix + "x.bin", expires_in=60)
    assert_refused(await fetch(url), backend, "signature_expired")


async def test_an_interrupted_download_resumes(backend: Backend, prefix: str,
                                               payload: tuple[Path, bytes]) -> None:
    path, data = payload
    key = prefix + "model.safetensors"
    await backend.store.put_file(key, path)
    url = await backend.store.url(key, expires_in=60)
    received = bytearray()
    async with httpx.AsyncClient(timeout=30) as client, client.stream("GET", url) as response:
        assert response.headers["accept-ranges"] == "bytes"
        async for chunk in response.aiter_bytes():
            received += chunk
            if len(received) >= 1_000_000:
                break  # the connection drops mid-file
    start = len(received)
    assert 0 < start < len(data)
    tail = await fetch(url, Range=f"bytes={start}-")
    assert tail.status_code == 206
    assert tail.headers["content-range"] == f"bytes {start}-{len(data) - 1}/{len(data)}"
    assert bytes(received) + tail.content == data


async def test_download_name(backend: Backend, prefix: str, tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"w")
    await backend.store.put_file(prefix + "w.bin", tmp_path / "w.bin")
    response = await fetch(await backend.store.url(prefix + "w.bin", expires_in=60,
                                                   filename="onnx/model.onnx"))
    assert response.status_code == 200
    assert response.headers["content-disposition"] == 'attachment; filename="model.onnx"'


async def test_delete_and_delete_prefix(backend: Backend, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"f" * 10)
    v10 = prefix.replace("/v1/", "/v10/")
    keys = [prefix + "a.bin", prefix + "sub/b.bin", prefix + "sub/deeper/c.bin", v10 + "a.bin"]
    for key in keys:
        await backend.store.put_file(key, src)

    await backend.store.delete(keys[0])
    assert await backend.store.stat(keys[0]) is None
    await backend.store.delete(keys[0])  # again: not an error

    await backend.store.delete_prefix(prefix)
    assert [await backend.store.stat(k) for k in keys[1:3]] == [None, None]
    assert await backend.store.stat(v10 + "a.bin") is not None, "v1/ must not touch v10/"
    assert (await fetch(await backend.store.url(keys[1], expires_in=60))).status_code == 404
    await backend.store.delete_prefix(prefix)  # again: not an error
    with pytest.raises(ValidationFailed):
        await backend.store.delete_prefix(prefix.rstrip("/"))  # would also match v10


@pytest.mark.parametrize("key", ["../escape.bin", "/abs.bin", "a//b.bin", "a\\b.bin", "a/\x00.bin"])
async def test_bad_keys_are_refused_everywhere(backend: Backend, key: str,
                                               payload: tuple[Path, bytes]) -> None:
    with pytest.raises(ValidationFailed):
        await backend.store.put_file(key, payload[0])
    with pytest.raises(ValidationFailed):
        await backend.store.stat(key)
    with pytest.raises(ValidationFailed):
        await backend.store.delete(key)
    with pytest.raises(ValidationFailed):
        await backend.store.url(key, expires_in=60)


@pytest.mark.parametrize("expires_in", [0, -1, 7 * 24 * 3600 + 1])
async def test_url_lifetime_is_bounded(backend: Backend, prefix: str, expires_in: int) -> None:
    with pytest.raises(ValidationFailed):
        await backend.store.url(prefix + "x.bin", expires_in=expires_in)


async def test_a_failed_put_leaves_nothing(backend: Backend, prefix: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await backend.store.put_file(prefix + "gone.bin", tmp_path / "does-not-exist.bin")
    assert await backend.store.stat(prefix + "gone.bin") is None


async def test_ping_says_which_storage_answers(backend: Backend) -> None:
    facts = await backend.store.ping()
    assert facts["backend"] == backend.name
    if backend.name == "local":
        assert facts["freeBytes"] > 0
    else:
        assert facts["bucket"] == "aiwm-objectstore-tests"


async def test_ping_fails_for_a_local_folder_that_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = LocalStore(root=blocker / "objects", public_url="http://127.0.0.1", secret="s" * 32)
    with pytest.raises(Unavailable, match="object store's folder"):
        await store.ping()

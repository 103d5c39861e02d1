"""serve.ingress.fewer_body_copies: uvicorn's httptools protocol collects request bodies in
BodyPieces, and a real uvicorn server still hands the app every byte, in order."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve.ingress import BodyPieces

ROOT = Path(__file__).resolve().parents[2]


def test_body_pieces_behave_as_the_bytearray_they_replace() -> None:
    body = BodyPieces()
    assert len(body) == 0 and bytes(body) == b""
    one = b"x" * 1000
    body += one
    assert len(body) == 1000 and bytes(body) is one  # one piece: handed over, not copied
    mutable = bytearray(b"abc")
    body += mutable
    body += b""
    mutable[:] = b"zzz"  # a caller reusing its buffer does not change what was collected
    assert len(body) == 1003 and bytes(body) == one + b"abc"


SERVER = textwrap.dedent("""
    import hashlib, sys, uvicorn
    from serve.ingress import fewer_body_copies
    assert fewer_body_copies() and fewer_body_copies()  # applies once, then says so again
    from uvicorn.protocols.http import httptools_impl
    from serve.ingress import BodyPieces
    assert httptools_impl.bytearray is BodyPieces

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        digest, size, messages = hashlib.sha256(), 0, 0
        while True:
            message = await receive()
            messages += 1
            assert type(message["body"]) is bytes
            digest.update(message["body"])
            size += len(message["body"])
            if not message.get("more_body"):
                break
        out = f"{size} {digest.hexdigest()} {messages}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools",
                loop="uvloop", log_level="warning")
""")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the uvicorn server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


def answer(r: httpx.Response) -> tuple[int, str, int]:
    assert r.status_code == 200, r.text
    size, sha, messages = r.text.split()
    return int(size), sha, int(messages)


@pytest.mark.parametrize("size", [0, 1, 65535, 65537, 5 * 2**20 + 3])
def test_every_byte_reaches_the_app_in_order(server: str, size: int) -> None:
    data = os.urandom(size)
    with httpx.Client(timeout=30) as client:
        for _ in range(2):  # the second request on the same connection starts afresh
            got_size, sha, _ = answer(client.post(server, content=data))
            assert (got_size, sha) == (size, hashlib.sha256(data).hexdigest())


def test_a_chunked_body_in_many_small_pieces(server: str) -> None:
    pieces = [os.urandom(n) for n in (1, 7, 4096, 70000, 3, 250000, 11)] * 20

    def stream() -> Iterator[bytes]:
        yield from pieces  # no length: Transfer-Encoding: chunked

    whole = b"".join(pieces)
    with httpx.Client(timeout=30) as client:
        size, sha, messages = answer(client.post(server, content=stream()))
    assert (size, sha) == (len(whole), hashlib.sha256(whole).hexdigest())
    assert messages >= 2  # it did arrive in several receive() calls

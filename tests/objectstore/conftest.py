"""Real parts for the object store tests: moto's S3 server (with a gateway that checks
presigned URLs the way S3 does) and the API's file route run by uvicorn.

``backend`` runs a test against both stores; each test writes under its own ``prefix``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI

from aiwm.objectstore import LocalStore, ObjectStore, S3Store
from serve import files, problems
from tests.support.moto_server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, PresignGateway, free_port

SECRET = "objectstore-test-secret-0123456789"
BUCKET = "aiwm-objectstore-tests"
PAYLOAD_SIZE = 6 * 1024 * 1024 + 123  # over S3's 5 MiB part size: a multipart upload


def wait_until(predicate: Callable[[], object], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class FileServer:
    """serve/files.py in a small app, served over HTTP by uvicorn in a thread."""

    store: LocalStore
    base_url: str
    app: FastAPI


@dataclass
class Backend:
    """One store under test, plus how to refer to its URLs' parts."""

    name: str
    store: ObjectStore
    make: Callable[[Callable[[], float]], ObjectStore]  # the same storage with another clock
    sig_param: str
    expires_param: str


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(log=tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def presign_gateway(moto: MotoServer) -> Iterator[PresignGateway]:
    gateway = PresignGateway(moto)
    gateway.start()
    yield gateway
    gateway.stop()


def s3_store(moto: MotoServer, gateway: PresignGateway, *, bucket: str = BUCKET,
             clock: Callable[[], float] = time.time, noncurrent_days: int = 7) -> S3Store:
    return S3Store(endpoint=moto.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                   secure=False, bucket=bucket, region=REGION, public_endpoint=gateway.endpoint,
                   noncurrent_days=noncurrent_days, clock=clock)


@pytest.fixture(scope="session")
def file_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    port = free_port()
    store = LocalStore(root=tmp_path_factory.mktemp("objects"),
                       public_url=f"http://127.0.0.1:{port}", secret=SECRET)
    app = FastAPI()
    problems.install(app)
    app.include_router(files.router, prefix="/api")
    app.state.object_store = store
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="file-server", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout=20, what="uvicorn")
    assert server.started, "uvicorn did not start"
    yield FileServer(store=store, base_url=f"http://127.0.0.1:{port}", app=app)
    server.should_exit = True
    thread.join(10)


@pytest_asyncio.fixture(scope="session", params=["local", "s3"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "local":
        server: FileServer = request.getfixturevalue("file_server")
        local = server.store

        def make_local(clock: Callable[[], float]) -> ObjectStore:
            return LocalStore(root=local.root, public_url=local.public_url, secret=SECRET, clock=clock)

        await local.ensure_ready()
        yield Backend("local", local, make_local, sig_param="sig", expires_param="expires")
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        gateway: PresignGateway = request.getfixturevalue("presign_gateway")
        s3 = s3_store(moto, gateway)

        def make_s3(clock: Callable[[], float]) -> ObjectStore:
            return s3_store(moto, gateway, clock=clock)

        await s3.ensure_ready()
        yield Backend("s3", s3, make_s3, sig_param="X-Amz-Signature", expires_param="X-Amz-Expires")


@pytest.fixture
def prefix() -> str:
    """A version folder no other test uses."""
    return f"models/org-{uuid.uuid4().hex[:12]}/model-1/v1/"


@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A ~6 MiB file of random bytes, and those bytes."""
    data = os.urandom(PAYLOAD_SIZE)
    path = tmp_path_factory.mktemp("payload") / "weights.bin"
    path.write_bytes(data)
    return path, data

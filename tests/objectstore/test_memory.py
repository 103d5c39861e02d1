"""Storing a 200 MB file never holds it in memory.

Each put runs in a fresh Python process, so its peak RSS (``ru_maxrss``) says what the
put itself cost; moto runs in a process of its own and is not counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from aiwm.objectstore import LocalStore, ObjectStore, S3Store
from aiwm.objectstore.base import hash_file
from tests.objectstore.conftest import BUCKET, SECRET
from tests.support.moto_server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer

SIZE = 200 * 1024 * 1024
LIMIT = 50 * 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


def big_file(path: Path) -> Path:
    """A sparse 200 MB file with a few marks in it, written without a big buffer."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, 37 * 1024 * 1024):
            f.seek(offset)
            f.write(hashlib.sha256(str(offset).encode()).digest())
    return path


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(backend: str, where: str, path: str) -> None:
    """Run in the fresh process: put ``path`` and print the peak RSS before and after."""
    store: ObjectStore
    if backend == "local":
        store = LocalStore(root=Path(where), public_url="http://unused", secret=SECRET)
    else:
        store = S3Store(endpoint=where, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False,
                        bucket=BUCKET, region=REGION)

    async def run() -> dict[str, object]:
        await store.ensure_ready()
        warm = Path(path).with_suffix(".warm")
        warm.write_bytes(b"w" * 1024)
        await store.put_file("models/mem/m/v1/warm.bin", warm)  # imports, pools, threads
        before = peak_rss()
        stored = await store.put_file("models/mem/m/v1/big.bin", Path(path))
        return {"before": before, "after": peak_rss(), "size": stored.size, "sha256": stored.sha256}

    print(json.dumps(asyncio.run(run())))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_200mb_put_stays_small(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source = big_file(tmp_path / "big.bin")
    if backend == "local":
        where = str(tmp_path / "objects")
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        where = moto.endpoint
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.objectstore.test_memory import child; "
         "child(*sys.argv[1:])", backend, where, str(source)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["size"], result["sha256"]) == hash_file(source)
    growth = result["after"] - result["before"]
    print(f"{backend}: peak RSS {result['before'] / 2**20:.0f} -> {result['after'] / 2**20:.0f} MiB "
          f"for a {SIZE / 2**20:.0f} MiB put")
    assert growth < LIMIT, f"peak RSS grew by {growth / 2**20:.0f} MiB storing {SIZE / 2**20:.0f} MiB"

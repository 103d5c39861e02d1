"""`aiwm models upload/import` as an operator runs them, and a 200 MB upload that the
server streams to disk without holding it in memory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from aiwm.cli_models import MultipartBody

AIWM = str(Path(sys.executable).with_name("aiwm"))


def make_model(api: httpx.Client, unique: Callable[[str], str]) -> dict[str, Any]:
    r = api.post("/models", json={"name": unique("cli"), "source": "upload"})
    assert r.status_code == 201, r.text
    return r.json()


def cli(*args: str, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIWM, "models", *args], env={**os.environ, "AIWM_TOKEN": token},
                          capture_output=True, text=True, timeout=180)


def test_cli_uploads_a_folder_and_imports_a_repo(
        api: httpx.Client, cluster: str, make_token: Callable[..., str], hub: Any,
        unique: Callable[[str], str], tmp_path: Path) -> None:
    model = make_model(api, unique)
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    token = make_token("operator")
    done = cli("upload", str(folder), "--model", model["id"], "--api", cluster, token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "version 1: 2 file(s)" in done.stdout
    files = api.get(f"/models/{model['id']}/versions").json()["data"][0]["files"]
    assert sorted(f["name"] for f in files) == ["config.json", "tokenizer/vocab.txt"]

    repo = f"acme/{unique('cli-repo')}"
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": b"w" * 300_000})
    done = cli("import", repo, "--model", model["id"], "--api", cluster, token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "version 2: 2 file(s), 300002 bytes" in done.stdout
    same = cli("import", repo, "--model", model["id"], "--api", cluster, token=token)
    assert same.returncode == 0 and "version 2 already holds" in same.stdout, same.stdout

    missing = cli("import", "acme/nothing-here", "--model", model["id"], "--api", cluster,
                  token=token)
    assert missing.returncode == 1 and "failed" in missing.stdout
    unknown = cli("upload", str(folder), "--model", "mdl-nope", "--api", cluster, token=token)
    assert unknown.returncode == 1 and "404" in unknown.stdout
    viewer = cli("upload", str(folder), "--model", model["id"], "--api", cluster,
                 token=make_token("viewer"))
    assert viewer.returncode == 1 and "403" in viewer.stdout
    listed = cli("versions", model["id"], "--api", cluster, token=token)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"{repo}@" in listed.stdout and "upload" in listed.stdout
    deleted = cli("delete-version", model["id"], "1", "--api", cluster, token=token)
    assert deleted.returncode == 0 and "version 1 deleted: 2 file(s)" in deleted.stdout
    assert [v["version"] for v in api.get(f"/models/{model['id']}/versions").json()["data"]] == [2]
    again = cli("delete-version", model["id"], "1", "--api", cluster, token=token)
    assert again.returncode == 1 and "404" in again.stdout
    no_token = subprocess.run([AIWM, "models", "upload", str(folder), "--model", model["id"]],
                              env={k: v for k, v in os.environ.items() if k != "AIWM_TOKEN"},
                              capture_output=True, text=True, timeout=60)
    assert no_token.returncode == 2 and "no token" in no_token.stdout


def replicas() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if "ServeReplica:aiwm:api" in " ".join(p.info["cmdline"] or []):
            found.append(p)
    assert found, "no API replica process found"
    return found


@pytest.mark.parametrize("way", ["api port", "upload port"])
def test_a_200_mb_upload_is_streamed_not_held_in_memory(
        api: httpx.Client, cluster: str, unique: Callable[[str], str], tmp_path: Path,
        way: str) -> None:
    """Through Serve's ingress and on the upload port, where uvicorn's own flow control
    holds the client back."""
    size = 200 * 2**20
    big = tmp_path / "weights.bin"
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        block = hashlib.sha256(b"seed").digest() * (2**20 // 32)
        for _ in range(size // len(block)):
            f.write(block)
            digest.update(block)
    expected = digest.hexdigest()
    model = make_model(api, unique)
    procs = replicas()
    before = {p.pid: p.memory_info().rss for p in procs}
    peak = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for p in procs:
                try:
                    peak[p.pid] = max(peak[p.pid], p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        body = MultipartBody({"modelId": model["id"]}, [("weights.bin", big)])
        url = "/models/upload" if way == "api port" else api.get("/models/upload-url").json()["url"]
        r = api.post(url, content=iter(body), timeout=300, headers={
            "Content-Type": f"multipart/form-data; boundary={body.boundary}",
            "Content-Length": str(body.length)})
    finally:
        stop.set()
        sampler.join()
    assert r.status_code == 201, r.text
    assert r.json()["bytes"] == size and r.json()["files"][0]["sha256"] == expected
    growth = {pid: (peak[pid] - before[pid]) / 2**20 for pid in before}
    assert max(growth.values()) < 50, f"replica memory grew by {growth} MiB for a 200 MiB upload"

"""``model.download`` and ``model.delete`` against a real local HTTP file server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nodeside.models
from nodeside.handlers import CommandFailed
from nodeside.models import ModelHandlers
from tests.nodeside.conftest import WEIGHTS, Emitted, FileServer, wait_until

CONFIG = b'{"layers": 2}'


@pytest.fixture()
def files() -> Iterator[FileServer]:
    server = FileServer({"/weights.bin": WEIGHTS, "/config.json": CONFIG})
    yield server
    server.close()


@pytest.fixture(autouse=True)
def quick_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resume broken transfers after 10 ms, not half a second, doubling."""
    monkeypatch.setattr(nodeside.models, "RESUME_DELAY", 0.01)


class Ticks:
    """A clock that moves one second per reading: every progress check may send."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture()
async def models(tmp_path: Path, emitted: Emitted) -> Any:
    handlers = ModelHandlers(root=tmp_path / "models", emit=emitted, clock=Ticks())
    yield handlers
    await handlers.aclose()


def entry(server: FileServer, name: str, path: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": server.url + path, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **extra}


def leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.rglob("*") if p.name.endswith(".part"))


async def test_download_checks_reports_progress_and_then_skips(
    models: ModelHandlers, files: FileServer, emitted: Emitted, tmp_path: Path
) -> None:
    request = {"modelId": "m-1", "files": [
        entry(files, "weights.bin", "/weights.bin", WEIGHTS),
        entry(files, "sub/config.json", "/config.json", CONFIG, sha256=None, size=None)]}
    result = await models.download(request)
    model_dir = tmp_path / "models" / "m-1"
    assert result == {"modelId": "m-1", "version": None, "path": str(model_dir), "files": 2,
                      "bytes": len(WEIGHTS) + len(CONFIG), "skipped": 0, "removed": 0,
                      "removedVersions": [], "evicted": []}
    assert (model_dir / "weights.bin").read_bytes() == WEIGHTS
    assert (model_dir / "sub" / "config.json").read_bytes() == CONFIG
    assert leftovers(model_dir) == []

    progress = emitted.of("model.downloadProgress")
    assert len(progress) >= 3  # the ticking clock lets every chunk report
    assert all(p["modelId"] == "m-1" and p["filesTotal"] == 2 for p in progress)
    assert all(p["bytesTotal"] is None for p in progress)  # one size is unknown
    done = [p["bytesDone"] for p in progress]
    assert done == sorted(done) and done[0] > 0
    assert progress[-1] == {"modelId": "m-1", "bytesDone": len(WEIGHTS) + len(CONFIG),
                            "bytesTotal": None, "filesDone": 2, "filesTotal": 2}

    asked = len(files.requests)
    again = await models.download(request)
    assert again == {**result, "skipped": 2}
    assert len(files.requests) == asked  # nothing fetched twice


async def test_progress_is_rate_limited(tmp_path: Path, files: FileServer) -> None:
    emitted = Emitted()
    frozen = ModelHandlers(root=tmp_path, emit=emitted, clock=lambda: 0.0)
    try:
        await frozen.download({"modelId": "m", "files": [
            entry(files, "w", "/weights.bin", WEIGHTS), entry(files, "c", "/config.json", CONFIG)]})
    finally:
        await frozen.aclose()
    # The clock never moves: only the final report goes out, with the total known.
    assert emitted.of("model.downloadProgress") == [{
        "modelId": "m", "bytesDone": len(WEIGHTS) + len(CONFIG),
        "bytesTotal": len(WEIGHTS) + len(CONFIG), "filesDone": 2, "filesTotal": 2}]


async def test_a_changed_file_is_fetched_again(models: ModelHandlers, files: FileServer,
                                               tmp_path: Path) -> None:
    target = tmp_path / "models" / "m" / "weights.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * len(WEIGHTS))  # right size, wrong content
    result = await models.download({"modelId": "m", "files": [
        entry(files, "weights.bin", "/weights.bin", WEIGHTS)]})
    assert result["skipped"] == 0 and target.read_bytes() == WEIGHTS


async def test_checksum_mismatch_leaves_nothing(models: ModelHandlers, files: FileServer,
                                                tmp_path: Path) -> None:
    bad = entry(files, "weights.bin", "/weights.bin", WEIGHTS, sha256="0" * 64)
    with pytest.raises(CommandFailed) as info:
        await models.download({"modelId": "m", "files": [bad]})
    assert info.value.code == "checksum_mismatch"
    model_dir = tmp_path / "models" / "m"
    assert not (model_dir / "weights.bin").exists() and leftovers(model_dir) == []


@pytest.mark.parametrize(("change", "code"), [
    ({"size": 5}, "size_mismatch"),
    ({"url": "/missing.bin"}, "download_failed"),
    ({"url": "http://127.0.0.1:1/nothing-listens"}, "download_failed"),
    ({"url": "file:///etc/passwd"}, "invalid_spec"),
    ({"name": "../escape.bin"}, "invalid_spec"),
    ({"name": "/etc/escape.bin"}, "invalid_spec"),
    ({"name": "a/../../escape.bin"}, "invalid_spec"),
    ({"sha256": "not-hex"}, "invalid_spec"),
])
async def test_download_errors(models: ModelHandlers, files: FileServer, tmp_path: Path,
                               change: dict[str, Any], code: str) -> None:
    f = {**entry(files, "weights.bin", "/weights.bin", WEIGHTS), **change}
    if f["url"].startswith("/"):
        f["url"] = files.url + f["url"]
    with pytest.raises(CommandFailed) as info:
        await models.download({"modelId": "m", "files": [f]})
    assert info.value.code == code, info.value.message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written anywhere


@pytest.mark.parametrize("model_id", ["..", ".", "a/b", "a\\b"])
async def test_model_ids_that_are_no_directory_name_are_refused(models: ModelHandlers,
                                                                model_id: str) -> None:
    for call in (models.download, models.delete):
        with pytest.raises(CommandFailed) as info:
            await call({"modelId": model_id, "files": []})
        assert info.value.code == "invalid_spec"


async def test_a_symlink_out_of_the_model_is_refused(models: ModelHandlers, files: FileServer,
                                                     tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "m"
    model_dir.mkdir(parents=True)
    (model_dir / "out").symlink_to(tmp_path)
    with pytest.raises(CommandFailed) as info:
        await models.download({"modelId": "m", "files": [
            entry(files, "out/weights.bin", "/weights.bin", WEIGHTS)]})
    assert info.value.code == "invalid_spec"
    assert not (tmp_path / "weights.bin").exists()


async def test_no_files_makes_the_directory_and_delete_removes_it(models: ModelHandlers,
                                                                 tmp_path: Path) -> None:
    result = await models.download({"modelId": "empty", "files": []})
    assert result == {"modelId": "empty", "version": None,
                      "path": str(tmp_path / "models" / "empty"), "files": 0,
                      "bytes": 0, "skipped": 0, "removed": 0, "removedVersions": [], "evicted": []}
    assert (tmp_path / "models" / "empty").is_dir()
    assert await models.delete({"modelId": "empty"}) == {"modelId": "empty", "version": None,
                                                         "deleted": True}
    assert not (tmp_path / "models" / "empty").exists()
    assert (await models.delete({"modelId": "empty"}))["deleted"] is False


async def test_a_cancelled_download_removes_its_partial_file(models: ModelHandlers,
                                                             files: FileServer, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "m"
    task = asyncio.create_task(models.download({"modelId": "m", "files": [
        entry(files, "weights.bin", "/stall/weights.bin", WEIGHTS)]}))
    await wait_until(lambda: leftovers(model_dir), what="a partial file")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(model_dir) == [] and not (model_dir / "weights.bin").exists()


async def test_a_write_error_in_the_hashing_thread_fails_the_download(
    models: ModelHandlers, files: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Receiving and hashing/writing run in two threads: an error on the writing side (a
    # full disk, say) must come back as itself, and leave no partial file behind.
    import nodeside.models as node_models

    real_sha256 = hashlib.sha256

    class FullDisk:
        def __init__(self, data: bytes = b"") -> None:
            self._inner = real_sha256(data)

        def update(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def hexdigest(self) -> str:
            return self._inner.hexdigest()

    request = {"modelId": "m-full", "files": [entry(files, "weights.bin", "/weights.bin", WEIGHTS)]}
    monkeypatch.setattr(node_models.hashlib, "sha256", FullDisk)
    with pytest.raises(CommandFailed) as info:
        await models.download(request)
    assert info.value.code == "insufficient_storage" and "No space left" in info.value.message
    assert leftovers(tmp_path / "models") == []
    monkeypatch.setattr(node_models.hashlib, "sha256", real_sha256)
    result = await models.download(request)
    assert result["bytes"] == len(WEIGHTS)  # and the next try succeeds


async def test_a_broken_transfer_resumes_where_it_stopped(models: ModelHandlers,
                                                          files: FileServer, tmp_path: Path) -> None:
    files.cuts = 2  # the first two answers break off after a third of what they send
    result = await models.download({"modelId": "m", "files": [
        entry(files, "weights.bin", "/cut/weights.bin", WEIGHTS)]})
    assert result["bytes"] == len(WEIGHTS)
    model_dir = tmp_path / "models" / "m"
    assert (model_dir / "weights.bin").read_bytes() == WEIGHTS and leftovers(model_dir) == []
    first = len(WEIGHTS) // 3
    second = first + (len(WEIGHTS) - first) // 3
    assert files.ranges == [None, f"bytes={first}-", f"bytes={second}-"]


async def test_a_server_that_ignores_range_is_read_again_from_the_start(
        models: ModelHandlers, files: FileServer, tmp_path: Path) -> None:
    files.cuts, files.ignore_range = 1, True
    await models.download({"modelId": "m", "files": [
        entry(files, "weights.bin", "/cut/weights.bin", WEIGHTS)]})
    assert (tmp_path / "models" / "m" / "weights.bin").read_bytes() == WEIGHTS
    assert len(files.requests) == 2 and files.ranges[1] is not None


async def test_a_transfer_that_never_gets_a_byte_gives_up_and_leaves_nothing(
        models: ModelHandlers, files: FileServer, tmp_path: Path) -> None:
    with pytest.raises(CommandFailed) as info:
        await models.download({"modelId": "m", "files": [
            entry(files, "weights.bin", "/dead/weights.bin", WEIGHTS)]})
    assert info.value.code == "download_failed" and "RemoteProtocolError" in info.value.message
    assert len(files.requests) == nodeside.models.RESUMES
    model_dir = tmp_path / "models" / "m"
    assert not (model_dir / "weights.bin").exists() and leftovers(model_dir) == []


def tree(folder: Path) -> list[str]:
    """The model files under ``folder`` (the agent's completion markers left out)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != nodeside.models.COMPLETE)


async def test_a_version_replaces_what_an_earlier_fetch_of_it_left_in_its_folder(
        models: ModelHandlers, files: FileServer, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "m"
    v1 = {"modelId": "m", "version": 1, "files": [
        entry(files, "shards/part-1.bin", "/weights.bin", WEIGHTS),
        entry(files, "shards/part-2.bin", "/config.json", CONFIG),
        entry(files, "config.json", "/config.json", CONFIG)]}
    first = await models.download(v1)
    assert first["removed"] == 0 and first["path"] == str(model_dir / "v1")
    (model_dir / "v1" / ".weights.bin.1234abcd.part").write_bytes(b"left by a killed agent")
    # No version named: the model's own folder, which versioned fetches leave alone.
    extra = {"modelId": "m", "files": [entry(files, "extra.bin", "/config.json", CONFIG)]}
    # (Its room check drops the partial file first: no fetch is under way for "m".)
    assert (await models.download(extra))["removed"] == 1
    assert not (model_dir / "v1" / ".weights.bin.1234abcd.part").exists()

    # The same version again, now with other files (it was re-made under that number).
    again = {"modelId": "m", "version": 1, "files": [
        entry(files, "model.bin", "/weights.bin", WEIGHTS),
        entry(files, "config.json", "/config.json", CONFIG)]}
    result = await models.download(again)
    assert result["skipped"] == 1 and result["removed"] == 2  # the 2 shards
    assert tree(model_dir / "v1") == ["config.json", "model.bin"]
    assert (model_dir / "extra.bin").read_bytes() == CONFIG


async def test_other_versions_go_unless_the_controller_or_a_server_here_still_uses_them(
        files: FileServer, tmp_path: Path, emitted: Emitted) -> None:
    root = tmp_path / "models"
    used: set[Path] = set()
    docker_down = False

    async def in_use() -> set[Path]:
        if docker_down:
            raise CommandFailed("docker_unavailable", "lost the Docker daemon")
        return used

    models = ModelHandlers(root=root, emit=emitted, in_use=in_use, clock=Ticks())

    def version(n: int, **extra: Any) -> dict[str, Any]:
        return {"modelId": "m", "version": n, **extra,
                "files": [entry(files, f"w{n}.bin", "/weights.bin", WEIGHTS)]}

    assert (await models.download(version(1)))["removedVersions"] == []
    # Another deployment on this node was last deployed with version 1: it stays.
    assert (await models.download(version(2, keep=[1])))["removedVersions"] == []
    assert tree(root / "m") == ["v1/w1.bin", "v2/w2.bin"]
    # No deployment record names 1 or 2 now, but a server here was given version 2.
    used.add(root / "m" / "v2")
    third = await models.download(version(3))
    assert third["removedVersions"] == ["v1"] and third["version"] == 3
    assert tree(root / "m") == ["v2/w2.bin", "v3/w3.bin"]
    # When the runtimes cannot say what they use, nothing else is removed.
    used.clear()
    docker_down = True
    assert (await models.download(version(4)))["removedVersions"] == []
    assert tree(root / "m") == ["v2/w2.bin", "v3/w3.bin", "v4/w4.bin"]

    # model.delete of one version takes that folder only; without one, the whole model.
    assert await models.delete({"modelId": "m", "version": 3}) == {
        "modelId": "m", "version": 3, "deleted": True}
    assert tree(root / "m") == ["v2/w2.bin", "v4/w4.bin"]
    assert (await models.delete({"modelId": "m", "version": 3}))["deleted"] is False
    assert (await models.delete({"modelId": "m"}))["deleted"] is True and not (root / "m").exists()
    with pytest.raises(CommandFailed) as info:
        await models.download(version(1, keep=[0]))
    assert info.value.code == "invalid_spec"

    # Unused versions go before the fetch (their room may be what it needs), so even a
    # download that then fails has removed them; a kept one stays.
    docker_down = False
    await models.download(version(1))
    await models.download(version(2, keep=[1]))
    with pytest.raises(CommandFailed) as info:
        await models.download({"modelId": "m", "version": 3, "keep": [2], "files": [
            entry(files, "w3.bin", "/missing.bin", WEIGHTS)]})
    assert info.value.code == "download_failed"
    assert tree(root / "m") == ["v2/w2.bin"]


async def test_prune_removes_the_versions_nothing_here_uses(
        files: FileServer, tmp_path: Path, emitted: Emitted) -> None:
    """A deploy's tidy step: model.prune with ``keep``."""
    root = tmp_path / "models"
    used: set[Path] = set()
    models = ModelHandlers(root=root, emit=emitted, in_use=lambda: _just(used), clock=Ticks())
    for n in (1, 2, 3, 4):
        await models.download({"modelId": "m", "version": n, "keep": [1, 2, 3],
                               "files": [entry(files, f"w{n}.bin", "/weights.bin", WEIGHTS)]})
    (root / "m" / "notes").mkdir()  # not a version folder: never touched
    used.add(root / "m" / "v2")  # a server here was given v2
    done = await models.prune({"modelId": "m", "keep": [4]})
    assert done == {"modelId": "m", "removedVersions": ["v1", "v3"]}
    assert tree(root / "m") == ["v2/w2.bin", "v4/w4.bin"]
    assert (await models.prune({"modelId": "m", "keep": [4]}))["removedVersions"] == []
    # A model the node never had: nothing to do, no error.
    assert (await models.prune({"modelId": "other", "keep": []}))["removedVersions"] == []
    for bad in ({"modelId": "m"}, {"modelId": "m", "keep": [0]}, {"modelId": "m", "keep": "4"},
                {"modelId": "../m", "keep": []}):
        with pytest.raises(CommandFailed) as info:
            await models.prune(bad)
        assert info.value.code == "invalid_spec", bad
    assert (root / "m" / "v2").is_dir() and (root / "m" / "notes").is_dir()
    # When the runtimes cannot say what they use, nothing is removed.
    used.clear()

    async def docker_down() -> set[Path]:
        raise CommandFailed("docker_unavailable", "lost the Docker daemon")

    models.in_use = docker_down
    assert (await models.prune({"modelId": "m", "keep": []}))["removedVersions"] == []
    assert tree(root / "m") == ["v2/w2.bin", "v4/w4.bin"]


async def _just(paths: set[Path]) -> set[Path]:
    return paths


async def test_files_that_cannot_fit_on_the_disk_are_not_started(
        models: ModelHandlers, files: FileServer, tmp_path: Path) -> None:
    free = __import__("shutil").disk_usage(tmp_path).free
    # The file server serves the real bytes; the size announced is more than the disk has.
    huge = entry(files, "weights.bin", "/weights.bin", WEIGHTS, size=free + 2**30)
    with pytest.raises(CommandFailed) as info:
        await models.download({"modelId": "m-big", "version": 1, "files": [
            entry(files, "config.json", "/config.json", CONFIG), huge]})
    assert info.value.code == "insufficient_storage"
    assert f"{free + 2**30 + len(CONFIG)} bytes" in info.value.message
    assert files.requests == []  # nothing was fetched
    # Files already here count for nothing: only what is still to fetch must fit.
    small = await models.download({"modelId": "m-big", "version": 1, "files": [
        entry(files, "config.json", "/config.json", CONFIG)]})
    assert small["files"] == 1 and small["skipped"] == 0


async def test_a_download_that_does_not_fit_evicts_what_the_controller_does_not_spare(
        files: FileServer, tmp_path: Path, emitted: Emitted) -> None:
    """A disk of room for four copies of WEIGHTS (the free space is simulated: what the
    cache holds, taken from a fixed size); the files are real and really removed."""
    root = tmp_path / "models"
    room = 4 * len(WEIGHTS) + 2**16
    used: set[Path] = set()

    def free(_: Path) -> int:
        return room - sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    models = ModelHandlers(root=root, emit=emitted, in_use=lambda: _just(used), clock=Ticks(),
                           free_space=free)

    def version(model: str, n: int, **extra: Any) -> dict[str, Any]:
        return {"modelId": model, "version": n, **extra,
                "files": [entry(files, "w.bin", "/weights.bin", WEIGHTS)]}

    for i, (model, n) in enumerate([("old", 1), ("used", 1), ("spared", 1), ("newer", 1)]):
        await models.download(version(model, n))
        os.utime(root / model / f"v{n}" / ".aiwm-complete", (1000 + i, 1000 + i))
    used.add(root / "used" / "v1")  # a server here was given it
    # Without `spare` (an older controller) nothing is evicted.
    with pytest.raises(CommandFailed) as info:
        await models.download(version("m", 1))
    assert info.value.code == "insufficient_storage" and "evicting" not in info.value.message
    # With it: the oldest folder nothing needs goes, and only as much as the files need.
    done = await models.download(version("m", 1, spare={"spared": [1]}))
    assert done["evicted"] == ["old/v1"] and done["files"] == 1
    assert tree(root) == ["m/v1/w.bin", "newer/v1/w.bin", "spared/v1/w.bin", "used/v1/w.bin"]
    # Two copies' worth: "newer" goes; "spared", "m" and "used" stay, so it still does not fit.
    big = {"modelId": "big", "version": 1, "spare": {"spared": [1], "m": [1]}, "files": [
        entry(files, "w.bin", "/weights.bin", WEIGHTS, size=2 * len(WEIGHTS))]}
    with pytest.raises(CommandFailed) as info:
        await models.download(big)
    assert info.value.code == "insufficient_storage"
    assert "after evicting newer/v1" in info.value.message
    assert tree(root) == ["m/v1/w.bin", "spared/v1/w.bin", "used/v1/w.bin"]
    assert files.requests.count("/weights.bin") == 5  # nothing fetched for the refused ones

    # A folder whose download finished after the command arrived (after the controller
    # computed `spare`) is not evicted.
    later = time.time() + 60
    os.utime(root / "spared" / "v1" / ".aiwm-complete", (later, later))
    with pytest.raises(CommandFailed) as info:
        await models.download({**big, "spare": {"m": [1]}})
    assert "evicting" not in info.value.message and (root / "spared" / "v1").is_dir()
    os.utime(root / "spared" / "v1" / ".aiwm-complete", (1002, 1002))
    # A model busy with a command of its own (running, or waiting for its turn) is passed
    # over, not waited for.
    async with models._model("spared"):
        with pytest.raises(CommandFailed):
            await asyncio.wait_for(models.download({**big, "spare": {"m": [1]}}), 10)
    assert (root / "spared" / "v1" / "w.bin").exists()
    # When the runtimes cannot say what they use, nothing is evicted.

    async def docker_down() -> set[Path]:
        raise CommandFailed("docker_unavailable", "lost the Docker daemon")

    models.in_use = docker_down
    with pytest.raises(CommandFailed):
        await models.download({**big, "spare": {"m": [1]}})
    assert tree(root) == ["m/v1/w.bin", "spared/v1/w.bin", "used/v1/w.bin"]
    with pytest.raises(CommandFailed) as info:
        await models.download({**big, "spare": {"x": [0]}})
    assert info.value.code == "invalid_spec"


async def test_the_cache_summary_lists_each_version(models: ModelHandlers, files: FileServer,
                                                    tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert nodeside.models.cache_summary(root) == {"models": [], "modelDirFree": None,
                                                   "modelCacheMax": None}
    await models.download({"modelId": "m", "version": 2, "files": [
        entry(files, "a/weights.bin", "/weights.bin", WEIGHTS),
        entry(files, "config.json", "/config.json", CONFIG)]})
    await models.download({"modelId": "m", "files": [entry(files, "x.json", "/config.json", CONFIG)]})
    (root / "m" / "v2" / ".weights.bin.1234abcd.part").write_bytes(b"12345")  # takes room too
    summary = nodeside.models.cache_summary(root)
    assert summary["models"] == [
        {"modelId": "m", "version": 2, "files": 3, "bytes": len(WEIGHTS) + len(CONFIG) + 5,
         "complete": True},
        {"modelId": "m", "version": None, "files": 1, "bytes": len(CONFIG), "complete": None}]
    assert summary["modelDirFree"] > 0 and summary["modelCacheMax"] is None
    assert nodeside.models.cache_summary(root, 10**9)["modelCacheMax"] == 10**9


async def test_a_capped_cache_evicts_or_refuses_what_would_pass_its_limit(
        files: FileServer, tmp_path: Path, emitted: Emitted) -> None:
    """AIWM_NODE_MODEL_CACHE_MAX on a real disk: room for two copies of WEIGHTS and a bit;
    what the cache holds is counted from its files, partial ones included."""
    root = tmp_path / "models"
    models = ModelHandlers(root=root, emit=emitted, in_use=lambda: _just(set()), clock=Ticks(),
                           max_bytes=2 * len(WEIGHTS) + 1000)

    def version(model: str, **extra: Any) -> dict[str, Any]:
        return {"modelId": model, "version": 1, **extra,
                "files": [entry(files, "w.bin", "/weights.bin", WEIGHTS)]}

    await models.download(version("a"))
    os.utime(root / "a" / "v1" / ".aiwm-complete", (1000, 1000))  # the older of the two
    await models.download(version("b"))
    # A third copy would pass the limit although the disk has room: refused before any
    # byte is fetched, naming the limit, when the controller sends no `spare`...
    with pytest.raises(CommandFailed) as info:
        await models.download(version("c"))
    assert info.value.code == "insufficient_storage"
    assert f"holds {2 * len(WEIGHTS)} bytes of the {2 * len(WEIGHTS) + 1000}" in info.value.message
    assert "AIWM_NODE_MODEL_CACHE_MAX" in info.value.message
    assert files.requests.count("/weights.bin") == 2
    # ...and with `spare`, the oldest version nothing needs makes room.
    done = await models.download(version("c", spare={"b": [1]}))
    assert done["evicted"] == ["a/v1"]
    assert tree(root) == ["b/v1/w.bin", "c/v1/w.bin"]
    # Partial files take room too: with one left behind, even evicting "b" is not enough
    # for a copy and a half.
    (root / "c" / "v1" / ".w.bin.1234abcd.part").write_bytes(b"x" * 2000)
    os.utime(root / "b" / "v1" / ".aiwm-complete", (1001, 1001))  # not just downloaded
    big = {"modelId": "d", "version": 1, "spare": {"c": [1]}, "files": [
        entry(files, "w.bin", "/weights.bin", WEIGHTS, size=len(WEIGHTS) + len(WEIGHTS) // 2)]}
    with pytest.raises(CommandFailed) as info:
        await models.download(big)
    assert "after evicting b/v1" in info.value.message and "AIWM_NODE_MODEL_CACHE_MAX" in \
        info.value.message


async def test_downloads_under_way_count_against_the_room_a_new_one_checks(
        files: FileServer, tmp_path: Path, emitted: Emitted) -> None:
    """Two models at once, room for one and a half: while the first is fetching, what it
    still expects to write is taken, so the second is refused instead of both passing."""
    root = tmp_path / "models"
    models = ModelHandlers(root=root, emit=emitted, clock=Ticks(), progress_interval=0,
                           max_bytes=len(WEIGHTS) + len(WEIGHTS) // 2)
    stalled = asyncio.create_task(models.download({"modelId": "first", "version": 1, "files": [
        entry(files, "w.bin", "/stall/weights.bin", WEIGHTS)]}))
    try:
        await wait_until(lambda: models._expected, timeout=10, what="the first's room check")
        with pytest.raises(CommandFailed) as info:
            await models.download({"modelId": "second", "version": 1, "files": [
                entry(files, "w.bin", "/weights.bin", WEIGHTS)]})
        assert info.value.code == "insufficient_storage"
        assert "expected by downloads under way" in info.value.message
    finally:
        stalled.cancel()  # (released, this server would send the rest half by half)
        files.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await stalled
    assert models._expected == {}  # nothing stays taken once the first has ended
    second = await models.download({"modelId": "second", "version": 1, "files": [
        entry(files, "w.bin", "/weights.bin", WEIGHTS)]})
    assert second["files"] == 1 and second["evicted"] == []


async def test_partial_files_an_agent_left_behind_are_dropped_before_the_room_check(
        files: FileServer, tmp_path: Path, emitted: Emitted) -> None:
    root = tmp_path / "models"
    left = root / "m" / "v1" / "sub" / ".w.bin.0123abcd.part"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"x" * len(WEIGHTS))  # what a killed agent was fetching
    models = ModelHandlers(root=root, emit=emitted, clock=Ticks(),
                           max_bytes=len(WEIGHTS) + 1000)
    done = await models.download({"modelId": "m", "version": 1, "files": [
        entry(files, "w.bin", "/weights.bin", WEIGHTS)]})
    assert done["files"] == 1 and not left.exists()
    assert tree(root) == ["m/v1/w.bin"]
    # A model file whose name looks like a partial file's is the model's, and stays.
    odd = await models.download({"modelId": "m", "version": 1, "files": [
        entry(files, "w.bin", "/weights.bin", WEIGHTS),
        entry(files, ".c.json.0123abcd.part", "/config.json", CONFIG)]})
    assert odd["files"] == 2 and odd["removed"] == 0
    again = await models.download({"modelId": "m", "version": 1, "files": [
        entry(files, "w.bin", "/weights.bin", WEIGHTS),
        entry(files, ".c.json.0123abcd.part", "/config.json", CONFIG)]})
    assert again["skipped"] == 2 and (root / "m" / "v1" / ".c.json.0123abcd.part").exists()


def test_the_cache_limit_reads_sizes_with_units(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from nodeside.config import AgentSettings
    monkeypatch.setenv("NODE_TOKEN", "t")
    monkeypatch.setenv("NODE_ID", "n1")
    assert AgentSettings().aiwm_node_model_cache_max is None
    for given, read in (("200GB", 200 * 10**9), ("1.5TiB", int(1.5 * 2**40)), ("4096", 4096)):
        monkeypatch.setenv("AIWM_NODE_MODEL_CACHE_MAX", given)
        assert AgentSettings().aiwm_node_model_cache_max == read
    for bad in ("0", "lots", "-5GB"):
        monkeypatch.setenv("AIWM_NODE_MODEL_CACHE_MAX", bad)
        with pytest.raises(ValidationError):
            AgentSettings()


def test_the_cache_summary_keeps_the_largest_when_there_are_too_many(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodeside.models, "SUMMARY_ENTRIES", 2)
    for i, size in enumerate((5, 50, 1, 20)):
        (tmp_path / f"m{i}" / "v1").mkdir(parents=True)
        (tmp_path / f"m{i}" / "v1" / "w.bin").write_bytes(b"x" * size)
    (tmp_path / ("x" * 101)).mkdir()  # no model id is that long: not a download's folder
    summary = nodeside.models.cache_summary(tmp_path)
    assert [(m["modelId"], m["bytes"]) for m in summary["models"]] == [("m1", 50), ("m3", 20)]


async def test_a_version_folder_is_marked_complete_only_once_its_download_finished(
        models: ModelHandlers, files: FileServer, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "m" / "v1"
    v1 = {"modelId": "m", "version": 1, "files": [
        entry(files, "config.json", "/config.json", CONFIG),
        entry(files, "weights.bin", "/weights.bin", WEIGHTS)]}
    await models.download(v1)
    assert nodeside.models.complete(folder)
    # The version re-made with a file that now fails: the folder is no whole version.
    broken = {**v1, "files": [v1["files"][0], entry(files, "more.bin", "/missing.bin", CONFIG)]}
    with pytest.raises(CommandFailed):
        await models.download(broken)
    assert not nodeside.models.complete(folder)
    await models.download(v1)  # fetched whole again: marked again
    assert nodeside.models.complete(folder)
    assert tree(folder) == ["config.json", "weights.bin"]
    with pytest.raises(CommandFailed) as info:  # no model file may take the marker's name
        await models.download({"modelId": "m", "version": 2, "files": [
            entry(files, ".aiwm-complete", "/config.json", CONFIG)]})
    assert info.value.code == "invalid_spec"

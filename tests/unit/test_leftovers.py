"""aiwm.leftovers on a real file system, with real flock locks: which staging folders
count as abandoned, and that their removal spares any folder a process works in."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from aiwm import leftovers, model_import
from aiwm.leftovers import IMPORT_LOCK, find, sweep, working_in

NOW = time.time()
DAY = 86400.0


def make(folder: Path, age: float, *, files: int = 2) -> Path:
    """A staging folder whose newest write is ``age`` seconds old."""
    (folder / "sub").mkdir(parents=True)
    for i in range(files):
        (folder / "sub" / f"f{i}.bin").write_bytes(b"x" * 100)
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (NOW - age, NOW - age), follow_symlinks=False)
    return folder


def names(found: list[leftovers.Leftover]) -> list[str]:
    return [f"{f.kind}:{f.path.name}" for f in found]


def test_the_import_lock_is_the_one_imports_take() -> None:
    assert IMPORT_LOCK == Path(model_import.STATE_DIR) / "lock"


def test_only_idle_unlocked_staging_folders_are_found(tmp_path: Path) -> None:
    make(tmp_path / "imports" / "old", 8 * DAY)
    make(tmp_path / "imports" / "recent", 2 * DAY)
    make(tmp_path / "tmp" / "upload-dead", 2 * 3600)
    make(tmp_path / "tmp" / "upload-new", 60)
    make(tmp_path / "tmp" / "not-an-upload", 30 * DAY)  # not ours: left alone
    # One write deep inside is activity: the folder is not idle.
    touched = make(tmp_path / "imports" / "touched", 30 * DAY)
    os.utime(touched / "sub" / "f0.bin", (NOW - 10, NOW - 10))

    found = find(tmp_path, import_ttl=7 * DAY, now=NOW)
    assert names(found) == ["import:old", "upload:upload-dead"]  # longest idle first
    assert found[0].bytes == 200 and found[0].idle >= 8 * DAY - 1
    assert names(find(tmp_path, import_ttl=DAY, now=NOW)) == [
        "import:old", "import:recent", "upload:upload-dead"]
    assert find(tmp_path / "nothing-here", import_ttl=DAY) == []


def test_a_folder_whose_lock_another_process_holds_is_never_removed(tmp_path: Path) -> None:
    busy = make(tmp_path / "imports" / "busy", 30 * DAY)
    (busy / IMPORT_LOCK).parent.mkdir(parents=True)
    lock = busy / IMPORT_LOCK
    lock.touch()
    for path in (lock, lock.parent, busy):  # made long ago, too
        os.utime(path, (NOW - 30 * DAY, NOW - 30 * DAY))
    # Another process fetching into it holds the lock, as aiwm.model_import does.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert sweep(tmp_path, import_ttl=DAY, now=NOW) == []
        assert (busy / "sub" / "f0.bin").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process died: the OS released the lock, and the folder goes.
    [removed] = sweep(tmp_path, import_ttl=DAY, now=NOW)
    assert removed.path == busy and not busy.exists()
    assert list((tmp_path / "imports").iterdir()) == []  # nor its .removing- name


def test_an_upload_in_progress_holds_its_folder(tmp_path: Path) -> None:
    spool = tmp_path / "tmp"
    live = make(spool / "upload-live", 3 * 3600)
    dead = make(spool / "upload-dead", 3 * 3600)
    with working_in(live):
        os.utime(live, (NOW - 3 * 3600, NOW - 3 * 3600))  # the lock file's own write
        os.utime(live / ".lock", (NOW - 3 * 3600, NOW - 3 * 3600))
        assert names(sweep(tmp_path, import_ttl=DAY, now=NOW)) == ["upload:upload-dead"]
        assert live.exists() and not dead.exists()
    assert names(sweep(tmp_path, import_ttl=DAY, now=NOW)) == ["upload:upload-live"]


def test_the_sweep_takes_the_lock_before_it_removes(tmp_path: Path) -> None:
    """Found idle, then locked by an import that started in the meantime: spared."""
    folder = make(tmp_path / "imports" / "raced", 30 * DAY)
    [left] = find(tmp_path, import_ttl=DAY, now=NOW)
    (folder / IMPORT_LOCK).parent.mkdir(parents=True)
    with open(folder / IMPORT_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        original = leftovers.find
        try:
            leftovers.find = lambda *a, **k: [left]  # type: ignore[assignment]
            assert sweep(tmp_path, import_ttl=DAY, now=NOW) == []
        finally:
            leftovers.find = original
    assert (folder / "sub" / "f0.bin").exists()

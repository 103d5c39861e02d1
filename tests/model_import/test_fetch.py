"""``fetch_repo`` and ``list_repo_files`` against a local HTTP server that speaks the part
of the HuggingFace Hub API huggingface_hub uses (tests/support/hf_hub.py)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import hf_hub_download

from aiwm.errors import (
    Cancelled,
    Forbidden,
    InvalidState,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from aiwm.model_import import STATE_DIR, ChecksumMismatch, ImportProgress, fetch_repo, list_repo_files
from tests.support.hf_hub import FakeHub

REPO = "acme/tiny-llm"
BIG = "model.safetensors"
FILES = {
    "README.md": b"# tiny-llm\nA model for tests.\n",
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}',
    "tokenizer.json": random.Random(1).randbytes(300_000),
    BIG: random.Random(0).randbytes(6_000_000),
}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def hub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add_repo(REPO, FILES)
        yield hub


class Ticks:
    """A clock that moves one second per reading: every progress check may send."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def fetch(hub: FakeHub, staging: Path, **kw: Any) -> tuple[str, list[tuple[Any, Path]]]:
    args: dict[str, Any] = {"repo_id": REPO, "revision": "main", "allow_patterns": None, "token": None}
    return fetch_repo(**{**args, **kw}, staging_dir=staging, endpoint=hub.url)


def served(hub: FakeHub) -> dict[str, int]:
    return {name: hub.served(REPO, name) for name in FILES}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


def partial(staging: Path, commit: str) -> Path:
    return staging / STATE_DIR / "partial" / commit / BIG


def test_full_fetch_checks_sizes_and_sha256(hub: FakeHub, tmp_path: Path) -> None:
    commit, files = list_repo_files(repo_id=REPO, revision=None, allow_patterns=None,
                                    endpoint=hub.url + "/", token=None)
    assert [f.name for f in files] == sorted(FILES)
    listed = {f.name: f for f in files}
    assert listed[BIG].sha256 == hashlib.sha256(FILES[BIG]).hexdigest()  # LFS: the Hub gives sha256
    assert listed["config.json"].sha256 is None and listed["config.json"].size == len(FILES["config.json"])

    fetched_commit, fetched = fetch(hub, tmp_path / "stage")
    assert fetched_commit == commit
    assert [f.name for f, _ in fetched] == sorted(FILES)
    for file, path in fetched:
        assert path == tmp_path / "stage" / file.name
        assert path.read_bytes() == FILES[file.name]
        assert file.size == len(FILES[file.name])
        assert file.sha256 == hashlib.sha256(FILES[file.name]).hexdigest()
    assert not (tmp_path / "stage" / STATE_DIR / "partial").exists()
    # Every file came from the resolved commit, not from the moving branch name.
    downloads = [path for method, path, _, _ in hub.requests if "/resolve/" in path]
    assert len(downloads) == len(FILES) and all(f"/resolve/{commit}/" in p for p in downloads)


def test_a_second_fetch_downloads_nothing(hub: FakeHub, tmp_path: Path) -> None:
    fetch(hub, tmp_path)
    before = served(hub)
    _, fetched = fetch(hub, tmp_path)
    assert served(hub) == before
    assert {f.name: f.sha256 for f, _ in fetched} == {
        n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}


def test_allow_patterns_select_files(hub: FakeHub, tmp_path: Path) -> None:
    _, fetched = fetch(hub, tmp_path, allow_patterns=["*.json"])
    assert [f.name for f, _ in fetched] == ["config.json", "tokenizer.json"]
    assert served(hub)[BIG] == 0 and not (tmp_path / BIG).exists()
    with pytest.raises(NotFound, match=REPO):
        fetch(hub, tmp_path, allow_patterns=["*.gguf"])


def test_progress_is_monotonic_and_reports_during_a_big_file(hub: FakeHub, tmp_path: Path) -> None:
    events: list[ImportProgress] = []
    fetch(hub, tmp_path, progress=events.append, clock=Ticks())
    total = sum(len(d) for d in FILES.values())
    assert events[0].bytes_done == 0 and events[0].files_done == 0
    assert all(e.bytes_total == total and e.files_total == len(FILES) for e in events)
    assert [e.bytes_done for e in events] == sorted(e.bytes_done for e in events)
    assert [e.files_done for e in events] == sorted(e.files_done for e in events)
    assert (events[-1].bytes_done, events[-1].files_done, events[-1].current) == (total, len(FILES), None)
    big_index = sorted(FILES).index(BIG)
    during = [e for e in events if e.current == BIG and e.files_done == big_index]
    assert any(0 < e.bytes_done - sum(len(FILES[n]) for n in sorted(FILES)[:big_index]) < len(FILES[BIG])
               for e in during)


def test_progress_is_throttled_by_the_clock(hub: FakeHub, tmp_path: Path) -> None:
    events: list[ImportProgress] = []
    fetch(hub, tmp_path, progress=events.append, clock=lambda: 0.0)
    # No time passes, so only the start, the per-file and the final events are sent.
    assert len(events) == 1 + 2 * len(FILES) + 1


def test_resume_after_an_interrupted_download(hub: FakeHub, tmp_path: Path) -> None:
    cut = 2_500_000
    hub.cut_next(REPO, BIG, after=cut)
    with pytest.raises(Unavailable, match="call again to resume") as info:
        fetch(hub, tmp_path)
    assert info.value.retryable and info.value.extra["file"] == BIG
    commit = hub.repos[REPO].refs["main"]
    assert partial(tmp_path, commit).stat().st_size == cut and not (tmp_path / BIG).exists()

    before = served(hub)
    events: list[ImportProgress] = []
    _, fetched = fetch(hub, tmp_path, progress=events.append)
    # Files finished before the break are not fetched again; the big one continues at `cut`.
    assert delta(served(hub), before) == {"README.md": 0, "config.json": 0, BIG: len(FILES[BIG]) - cut,
                                          "tokenizer.json": len(FILES["tokenizer.json"])}
    assert ("GET", f"/{REPO}/resolve/{commit}/{BIG}", f"bytes={cut}-", 206) in hub.requests
    assert all(path.read_bytes() == FILES[f.name] for f, path in fetched)
    assert events[-1].bytes_done == sum(len(d) for d in FILES.values())


def test_resume_after_the_process_was_killed(hub: FakeHub, tmp_path: Path) -> None:
    # A child process fetches and SIGKILLs itself once the big file is half there.
    script = f"""
import os, signal, sys
from pathlib import Path
from aiwm.model_import import fetch_repo
def progress(p):
    if p.current == {BIG!r} and p.bytes_done > {len(FILES[BIG]) // 2}:
        os.kill(os.getpid(), signal.SIGKILL)
fetch_repo(repo_id={REPO!r}, revision="main", allow_patterns=None, staging_dir=Path(sys.argv[1]),
           endpoint={hub.url!r}, token=None, progress=progress, clock=iter(range(10**9)).__next__)
"""
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, timeout=120)
    assert child.returncode == -9
    hub.wait_idle()
    commit = hub.repos[REPO].refs["main"]
    have = partial(tmp_path, commit).stat().st_size
    assert 0 < have < len(FILES[BIG])

    before = served(hub)
    _, fetched = fetch(hub, tmp_path)
    assert delta(served(hub), before) == {"README.md": 0, "config.json": 0, BIG: len(FILES[BIG]) - have,
                                          "tokenizer.json": len(FILES["tokenizer.json"])}
    assert all(path.read_bytes() == FILES[f.name] for f, path in fetched)


def test_cancel_stops_mid_file_and_a_new_call_resumes(hub: FakeHub, tmp_path: Path) -> None:
    cancel = threading.Event()

    def progress(p: ImportProgress) -> None:
        if p.current == BIG and p.bytes_done > len(FILES["README.md"]) + len(FILES["config.json"]):
            cancel.set()

    with pytest.raises(Cancelled, match=REPO):
        fetch(hub, tmp_path, progress=progress, cancel=cancel, clock=Ticks())
    hub.wait_idle()
    commit = hub.repos[REPO].refs["main"]
    have = partial(tmp_path, commit).stat().st_size
    assert 0 < have < len(FILES[BIG]) and not (tmp_path / BIG).exists()
    assert served(hub)["tokenizer.json"] == 0

    before = served(hub)
    fetch(hub, tmp_path)
    assert delta(served(hub), before)[BIG] == len(FILES[BIG]) - have
    assert (tmp_path / BIG).read_bytes() == FILES[BIG]


def test_cancel_before_the_first_file(hub: FakeHub, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        fetch(hub, tmp_path, cancel=cancel)
    assert sum(served(hub).values()) == 0


def test_private_repo_needs_a_token_that_can_read_it(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("acme/secret", {"config.json": b"{}"}, readers={"hf_reader"})
    hub.tokens.add("hf_someone_else")
    _, fetched = fetch(hub, tmp_path / "ok", repo_id="acme/secret", token="hf_reader")
    assert fetched[0][1].read_bytes() == b"{}"
    with pytest.raises(Unauthorized, match="HUGGINGFACE_API_KEY") as info:
        fetch(hub, tmp_path / "anon", repo_id="acme/secret")
    assert info.value.extra["repoId"] == "acme/secret"
    with pytest.raises(Unauthorized, match="refused the token"):
        fetch(hub, tmp_path / "bad", repo_id="acme/secret", token="hf_bogus")
    with pytest.raises(Forbidden, match="acme/secret"):
        fetch(hub, tmp_path / "other", repo_id="acme/secret", token="hf_someone_else")
    requests = [r for r in hub.requests if "secret" in r[1]]
    assert [r[3] for r in requests[-3:]] == [401, 401, 403]  # refused at the model info call


def test_unknown_repo_and_revision(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="acme/missing") as info:
        fetch(hub, tmp_path, repo_id="acme/missing")
    assert info.value.extra["repoId"] == "acme/missing"
    with pytest.raises(NotFound, match="no-such-branch") as info:
        fetch(hub, tmp_path, revision="no-such-branch")
    assert info.value.extra == {"repoId": REPO, "revision": "no-such-branch"}


def test_a_pinned_revision_is_fetched_after_the_branch_moved(hub: FakeHub, tmp_path: Path) -> None:
    first = hub.repos[REPO].refs["main"]
    second = hub.add_repo(REPO, {**FILES, "config.json": b'{"hidden_size": 128}'})
    assert list_repo_files(repo_id=REPO, revision="main", allow_patterns=None, endpoint=hub.url,
                           token=None)[0] == second
    commit, fetched = fetch(hub, tmp_path, revision=first, allow_patterns=["config.json"])
    assert commit == first and fetched[0][1].read_bytes() == FILES["config.json"]
    # The staging dir now follows main: the changed file is replaced, the unchanged LFS file kept.
    before = served(hub)
    fetch(hub, tmp_path, allow_patterns=["config.json"])
    assert (tmp_path / "config.json").read_bytes() == b'{"hidden_size": 128}'
    assert delta(served(hub), before)["config.json"] > 0


def test_sha256_mismatch_is_caught_and_the_bytes_discarded(hub: FakeHub, tmp_path: Path) -> None:
    hub.tamper(REPO, BIG, random.Random(2).randbytes(len(FILES[BIG])))
    with pytest.raises(ChecksumMismatch, match="sha256") as info:
        fetch(hub, tmp_path)
    assert info.value.retryable and info.value.extra["expected"] == hashlib.sha256(FILES[BIG]).hexdigest()
    commit = hub.repos[REPO].refs["main"]
    assert not (tmp_path / BIG).exists() and not partial(tmp_path, commit).exists()


def test_a_file_name_leading_out_of_the_staging_dir_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("acme/evil", {"../escape.txt": b"x", "config.json": b"{}"})
    with pytest.raises(ValidationFailed, match="escape.txt") as info:
        fetch(hub, tmp_path / "stage", repo_id="acme/evil")
    assert info.value.extra["repoId"] == "acme/evil"
    assert not (tmp_path / "escape.txt").exists()
    assert not any("/resolve/" in path for _, path, _, _ in hub.requests)
    _, fetched = fetch(hub, tmp_path / "stage", repo_id="acme/evil", allow_patterns=["*.json"])
    assert [f.name for f, _ in fetched] == ["config.json"]


def test_an_unreachable_hub_is_unavailable(tmp_path: Path) -> None:
    hub = FakeHub()
    url = hub.url
    hub.stop()
    with pytest.raises(Unavailable, match="cannot reach") as info:
        fetch_repo(repo_id=REPO, revision=None, allow_patterns=None, staging_dir=tmp_path, endpoint=url,
                   token=None)
    assert info.value.retryable


def test_one_import_at_a_time_per_staging_dir(hub: FakeHub, tmp_path: Path) -> None:
    inside, release = threading.Event(), threading.Event()

    def hold(p: ImportProgress) -> None:
        inside.set()
        release.wait(30)

    first = threading.Thread(target=fetch, args=(hub, tmp_path), kwargs={"progress": hold})
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(InvalidState, match="another import"):
            fetch(hub, tmp_path)
    finally:
        release.set()
        first.join(30)
    assert (tmp_path / BIG).read_bytes() == FILES[BIG]


def test_the_fake_hub_serves_huggingface_hubs_own_downloader(hub: FakeHub, tmp_path: Path) -> None:
    # HEAD for the metadata (X-Repo-Commit, ETag, X-Linked-*), then GET: the server is faithful
    # enough for hf_hub_download, not only for our fetcher.
    for name in (BIG, "config.json"):
        path = hf_hub_download(REPO, name, local_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                               endpoint=hub.url, token=False)
        assert Path(path).read_bytes() == FILES[name]
    assert any(method == "HEAD" for method, *_ in hub.requests)

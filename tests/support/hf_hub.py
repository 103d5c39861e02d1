"""A local stand-in for the HuggingFace Hub: the part of its HTTP API that huggingface_hub
uses to read model info and download files, in the standard library only.

- ``GET /api/models/{repo_id}`` and ``/api/models/{repo_id}/revision/{revision}``: model
  info with ``sha`` and ``siblings``; with ``?blobs=true`` each sibling has ``size``,
  ``blobId`` and, for LFS files, ``lfs: {size, sha256, pointerSize}``
- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``: the file, with
  ``X-Repo-Commit``, ``ETag`` (git blob sha1, or sha256 for LFS files), ``X-Linked-Etag``
  and ``X-Linked-Size`` for LFS files, ``Content-Length``, and ``Range`` (206/416)
- errors as the Hub sends them: 404 with ``X-Error-Code`` ``RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound``; for a private repo, 401 without a token,
  401 ``Invalid credentials in Authorization header`` for an unknown token, and 403 for a
  known token that may not read it (what the Hub answers a fine-grained token)

Test hooks: :meth:`FakeHub.served` counts body bytes sent per file, :meth:`FakeHub.cut_next`
breaks the next download of a file after N bytes, :meth:`FakeHub.tamper` serves other
bytes than the metadata advertises.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".h5")
WRITE_CHUNK = 64 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    readers: set[str] | None  # tokens that may read it; None: public
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


class _Problem(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class FakeHub:
    """Start with ``with FakeHub() as hub:``; point huggingface_hub at ``hub.url``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0  # requests being answered
        self._served: dict[tuple[str, str], int] = defaultdict(int)
        self._cuts: dict[tuple[str, str], int] = {}
        self._tampered: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str, str | None, int]] = []  # method, path, Range, status
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hf-hub",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: Mapping[str, bytes], *, branch: str = "main",
                 readers: set[str] | None = None) -> str:
        """Commit ``files`` as the whole tree of ``branch``; return the commit sha. A repo is
        private when ``readers`` (tokens) is given on its first commit."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id=repo_id, readers=readers))
        self.tokens |= readers or set()
        tree = hashlib.sha1()
        for name in sorted(files):
            tree.update(f"{name}\0{git_blob_sha1(files[name])}\0".encode())
        tree.update(repo.refs.get(branch, "").encode())
        commit = tree.hexdigest()
        repo.commits[commit] = dict(files)
        repo.refs[branch] = commit
        return commit

    def served(self, repo_id: str, filename: str) -> int:
        """Body bytes of ``filename`` sent so far by ``GET /resolve`` (all revisions)."""
        with self._lock:
            return self._served[(repo_id, filename)]

    def cut_next(self, repo_id: str, filename: str, after: int) -> None:
        """The next GET of ``filename`` sends ``after`` body bytes, then drops the connection."""
        with self._lock:
            self._cuts[(repo_id, filename)] = after

    def tamper(self, repo_id: str, filename: str, data: bytes) -> None:
        """Serve ``data`` for ``filename`` while model info and headers describe the original."""
        with self._lock:
            self._tampered[(repo_id, filename)] = data

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no request is being answered: a response the client abandoned (a
        cancel, a killed process) keeps counting bytes until the server sees the socket go."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, timeout):
                raise AssertionError(f"the fake Hub still answers {self._active} request(s) after {timeout}s")

    # --- request handling (called from the handler's threads) ---

    def begin(self) -> None:
        with self._lock:
            self._active += 1

    def end(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def authorize(self, repo: Repo | None, authorization: str | None) -> None:
        token = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
        if token is not None and token not in self.tokens:
            raise _Problem(401, None, "Invalid credentials in Authorization header")
        if repo is None:
            raise _Problem(404, "RepoNotFound", "Repository not found")
        if repo.readers is not None and token is None:
            raise _Problem(401, "RepoNotFound", "Repository not found")
        if repo.readers is not None and token not in repo.readers:
            raise _Problem(403, None, "This token does not have read access to the repo")

    def commit_of(self, repo: Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise _Problem(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def model_info(self, repo_id: str, revision: str, blobs: bool, auth: str | None) -> dict[str, Any]:
        repo = self.repos.get(repo_id)
        self.authorize(repo, auth)
        assert repo is not None
        commit = self.commit_of(repo, revision)
        siblings = []
        for name, data in sorted(repo.commits[commit].items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                lfs = _is_lfs(name)
                sibling.update(size=len(data), blobId=git_blob_sha1(data))
                if lfs:
                    sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                      "pointerSize": 134}
            siblings.append(sibling)
        return {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit,
                "private": repo.readers is not None, "gated": False, "disabled": False,
                "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                "library_name": "transformers", "siblings": siblings}

    def file(self, repo_id: str, revision: str, filename: str, auth: str | None) -> tuple[str, bytes, bytes]:
        """``(commit, advertised bytes, bytes to send)``."""
        repo = self.repos.get(repo_id)
        self.authorize(repo, auth)
        assert repo is not None
        commit = self.commit_of(repo, revision)
        data = repo.commits[commit].get(filename)
        if data is None:
            raise _Problem(404, "EntryNotFound", f"{filename} does not exist on {revision}", commit)
        with self._lock:
            return commit, data, self._tampered.get((repo_id, filename), data)

    def take_cut(self, repo_id: str, filename: str) -> int | None:
        with self._lock:
            return self._cuts.pop((repo_id, filename), None)

    def count(self, repo_id: str, filename: str, n: int) -> None:
        with self._lock:
            self._served[(repo_id, filename)] += n


def _is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aiwm-fake-hf-hub/1"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._route(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(body=False)

    def _route(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        status = 200
        self.hub.begin()
        try:
            if url.path.startswith("/api/models/"):
                repo_id, _, revision = url.path[len("/api/models/"):].partition("/revision/")
                blobs = parse_qs(url.query).get("blobs", ["false"])[0].lower() == "true"
                info = self.hub.model_info(unquote(repo_id), unquote(revision) or "main", blobs, auth)
                self._json(200, info, body=body)
            elif "/resolve/" in url.path:
                repo_id, _, rest = url.path[1:].partition("/resolve/")
                revision, _, filename = rest.partition("/")
                status = self._file(unquote(repo_id), unquote(revision), unquote(filename), auth, body=body)
            else:
                raise _Problem(404, None, "Not found")
        except _Problem as p:
            status = p.status
            headers = {"X-Error-Message": p.message}
            if p.code:
                headers["X-Error-Code"] = p.code
            if p.commit:
                headers["X-Repo-Commit"] = p.commit
            self._json(p.status, {"error": p.message}, body=body, headers=headers)
        finally:
            self.hub.requests.append((self.command, self.path, self.headers.get("Range"), status))
            self.hub.end()

    def _file(self, repo_id: str, revision: str, filename: str, auth: str | None, *, body: bool) -> int:
        commit, advertised, data = self.hub.file(repo_id, revision, filename, auth)
        lfs = _is_lfs(filename)
        etag = hashlib.sha256(advertised).hexdigest() if lfs else git_blob_sha1(advertised)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(advertised))})
        start, end = 0, len(data)
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last) + 1, len(data)) if last else len(data)
            if start >= len(data):
                self._send(416, {**headers, "Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
                return 416
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        headers["Content-Length"] = str(end - start)
        self._send(status, headers)
        if not body:
            return status
        cut = self.hub.take_cut(repo_id, filename)
        stop = end if cut is None else min(end, start + cut)
        view = memoryview(data)
        try:
            for at in range(start, stop, WRITE_CHUNK):
                piece = view[at:min(at + WRITE_CHUNK, stop)]
                self.wfile.write(piece)
                self.hub.count(repo_id, filename, len(piece))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (a cancelled download)
        if stop < end:
            self.close_connection = True  # the response is short: the client sees a broken transfer
        return status

    def _send(self, status: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _json(self, status: int, payload: Any, *, body: bool,
              headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self._send(status, {**(headers or {}), "Content-Type": "application/json",
                            "Content-Length": str(len(data))})
        if body:
            self.wfile.write(data)

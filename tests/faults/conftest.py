"""Shared parts of the fault suite: real agents (direct or behind a cuttable link), a
recorder that classifies every answer the API gave while a fault was on, and the
check, after every test, that the stack is green again for the tests that follow."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import wait_for
from tests.integration.nodes_helpers import AgentProcess, Node, make_node, wait_status

PROBLEM = "application/problem+json"


def healthy(cluster: str) -> bool:
    try:
        return httpx.get(f"{cluster}/api/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(autouse=True)
def green_after(cluster: str) -> Iterator[None]:
    """Every fault test leaves the stack as it found it: healthy, by itself."""
    yield
    wait_for(lambda: healthy(cluster), timeout=90, what="/api/health to be green after the fault")


@pytest.fixture(scope="session")
def ws_url(cluster: str) -> str:
    return cluster.replace("http://", "ws://") + "/ws/node"


@pytest.fixture()
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start real agent processes (``python -m nodeside.agent``), each with its own state."""
    started: list[AgentProcess] = []

    def start(node: Node, url: str, state: str = "agent", **env: str) -> AgentProcess:
        directory = tmp_path / state
        directory.mkdir(exist_ok=True)
        process = AgentProcess(ws_url=url, node=node, state_dir=directory, extra_env=env).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture()
def agent(api: httpx.Client, unique: Callable[[str], str], ws_url: str,
          agents: Callable[..., AgentProcess]) -> tuple[Node, AgentProcess]:
    """A new node with a real agent process, online (as in tests/integration/conftest.py)."""
    node = make_node(api, unique)
    process = agents(node, ws_url)
    wait_status(node, "online")
    return node, process


def sessions(process: AgentProcess) -> int:
    """How many sessions the agent has registered so far (from its log)."""
    return process.log().count("registered as")


# --- answers under a fault -----------------------------------------------------------


@dataclass
class Outcome:
    what: str
    at: float
    status: int | None = None  # None: no HTTP answer at all
    body: Any = None
    content_type: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


@dataclass
class Recorder:
    """Every request made while a fault is on, and how it ended."""

    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, what: str, send: Callable[[], httpx.Response]) -> Outcome:
        at = time.monotonic()
        try:
            r = send()
        except httpx.TransportError as e:
            outcome = Outcome(what, at, error=f"{type(e).__name__}: {e}")
        else:
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            outcome = Outcome(what, at, r.status_code, body, r.headers.get("content-type", ""))
            if r.status_code == 503:
                outcome.error = r.headers.get("retry-after", "")
        with self.lock:
            self.outcomes.append(outcome)
        return outcome

    def failures(self) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if not o.ok]

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self.lock:
            for o in self.outcomes:
                key = f"{o.what} {o.status if o.status is not None else 'no answer'}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def assert_only_unavailable(self, *, allow: Callable[[Outcome], bool] = lambda o: False,
                                transport_errors: bool = False, context: str = "") -> None:
        """No 500 and no other surprise: whatever failed failed as 503 problem+json
        ``unavailable`` with Retry-After (or matches ``allow``; or, where the fault cuts
        connections, had no HTTP answer at all)."""
        bad = []
        for o in self.failures():
            if allow(o):
                continue
            if o.status is None:
                if not transport_errors:
                    bad.append(o)
            elif o.status == 503:
                if not (o.content_type.startswith(PROBLEM) and isinstance(o.body, dict)
                        and o.body.get("code") == "unavailable" and o.error == "5"):
                    bad.append(o)
            else:
                bad.append(o)
        assert not bad, (f"unexpected answers under the fault: {bad[:5]} "
                         f"(all: {self.statuses()}) {context}")


@pytest.fixture()
def recorder() -> Recorder:
    return Recorder()


class Loop:
    """Runs ``job(thread, n)`` over and over in threads until stopped (``n`` is unique
    across threads); an exception in a job fails the test at ``stop()``."""

    def __init__(self, job: Callable[[int, int], None], threads: int = 1,
                 pause: float = 0.0) -> None:
        self._job, self._pause = job, pause
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self._job(n, n * 1_000_000 + i)
            except BaseException as e:  # noqa: BLE001 - reported by stop()
                self._errors.append(e)
                return
            i += 1
            if self._pause:
                time.sleep(self._pause)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        if self._errors:
            raise self._errors[0]


# --- processes of this session's cluster -------------------------------------------------


def cluster_processes(fragment: str) -> list[psutil.Process]:
    """Processes of *this* test session's Ray cluster (descendants of this process: the
    local cluster's raylet is our child) whose command line contains ``fragment``; other
    Ray clusters on the machine are never touched."""
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if fragment in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def actor_pid(actor: Any) -> int:
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60))


# --- a link that can be cut --------------------------------------------------------------


class Link:
    """A TCP forwarder between agents and the API. ``cut()`` drops every connection and
    refuses new ones (the agent is cut off, both ends still running); ``mend()`` lets
    connections through again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/ws/node") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self._cut.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _drop(s)
            with self._lock:
                self._sockets -= {src, dst}

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            live = list(self._sockets)
        for s in live:
            _drop(s)

    def mend(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()


def _drop(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture()
def link(cluster: str) -> Iterator[Link]:
    host, port = cluster.removeprefix("http://").split(":")
    forwarder = Link((host, int(port)))
    yield forwarder
    forwarder.close()

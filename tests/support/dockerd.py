"""A Docker daemon for the tests: the host's, if one answers, else a private ``dockerd``.

:func:`start_dockerd` returns a :class:`Dockerd` whose ``socket`` answers; ``stop()`` ends
the daemon if this module started it (and leaves a borrowed one alone). Tests that need
Docker must fail, not skip, where there is none: CI installs docker.io, so a missing daemon
there is a broken setup, not an optional feature. The pytest fixture is ``dockerd`` in
tests/nodeside/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

DEFAULT_SOCKET = "/var/run/docker.sock"
DOCKERD_PATHS = ("/usr/sbin/dockerd", "/usr/bin/dockerd")


class DockerdUnavailable(RuntimeError):
    """No Docker daemon answers and none can be started here."""


@dataclass
class Dockerd:
    socket: str  # a path, without unix://
    proc: subprocess.Popen[bytes] | None = None  # None: a daemon we only borrow
    home: Path | None = None  # data root, exec root, socket and log of ours
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=120)

    def stop(self) -> None:
        """End our daemon (its containers stop with it) and delete its files."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Dockerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def answers(socket_path: str) -> bool:
    if not Path(socket_path).exists():
        return False
    try:
        client = docker.DockerClient(base_url=f"unix://{socket_path}", timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except docker.errors.DockerException:
        return False


def existing_socket() -> str | None:
    """``DOCKER_HOST`` (a unix socket) or the default socket, if a daemon answers there."""
    host = os.environ.get("DOCKER_HOST", "")
    candidates = [host.removeprefix("unix://")] if host.startswith("unix://") else []
    candidates.append(DEFAULT_SOCKET)
    return next((c for c in candidates if answers(c)), None)


def dockerd_binary() -> str:
    found = shutil.which("dockerd") or next((p for p in DOCKERD_PATHS if Path(p).is_file()), None)
    if found is None:
        raise DockerdUnavailable(
            "these tests need Docker: no daemon answers at DOCKER_HOST or /var/run/docker.sock "
            "and there is no dockerd binary to start one (apt-get install docker.io)")
    return found


def start_dockerd(*, timeout: float = 60.0) -> Dockerd:
    """A Docker daemon that answers: the host's one if there is one, else a new private
    dockerd (needs root). Call ``stop()`` when done, or use it as a context manager."""
    borrowed = existing_socket()
    if borrowed is not None:
        return Dockerd(socket=borrowed)
    binary = dockerd_binary()
    # dockerd's exec root holds unix sockets (path limit: 108 bytes): keep it short.
    home = Path(tempfile.mkdtemp(prefix="aiwm-dd-", dir="/tmp"))
    socket_path, log_path = home / "docker.sock", home / "dockerd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [binary, "--data-root", str(home / "data"), "--exec-root", str(home / "x"),
             "-H", f"unix://{socket_path}", "--pidfile", str(home / "dockerd.pid")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # a Ctrl-C in the terminal is pytest's, not dockerd's
    daemon = Dockerd(socket=str(socket_path), proc=proc, home=home, log=log_path)
    deadline = time.monotonic() + timeout
    while not answers(str(socket_path)):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:]
            daemon.stop()
            raise DockerdUnavailable(f"dockerd did not come up (exit code {proc.poll()}):\n{tail}")
        time.sleep(0.2)
    return daemon

"""The embedded database: a SecantusDB server process with its data in AIWM_HOME/db.

Used when no MONGODB_URI is given. It runs as its own process (not inside Ray), so it
outlives a Ray restart; ``aiwm down`` stops it, and its data survives a down/up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

PID_FILE = "secantusd.pid"


@dataclass(frozen=True)
class DbProcess:
    pid: int
    port: int
    data_dir: Path
    log_file: Path


def _paths(home: Path) -> tuple[Path, Path, Path]:
    return home / "db", home / "run" / PID_FILE, home / "logs" / "secantusd.log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ping(port: int, *, timeout: float = 1.0) -> bool:
    """True when a MongoDB-wire server answers ``ping`` on 127.0.0.1:``port``."""
    client: MongoClient = MongoClient(
        f"mongodb://127.0.0.1:{port}",
        serverSelectionTimeoutMS=int(timeout * 1000),
        connectTimeoutMS=int(timeout * 1000),
    )
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


def running(home: Path) -> int | None:
    """The pid of the embedded server if ``aiwm`` started one that is still alive."""
    _, pid_file, _ = _paths(home)
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start(home: Path, port: int, *, timeout: float = 30.0) -> DbProcess:
    """Start SecantusDB unless ours already runs; wait until it answers ``ping``."""
    data_dir, pid_file, log_file = _paths(home)
    pid = running(home)
    if pid is not None:
        if not ping(port):
            raise RuntimeError(
                f"embedded database (pid {pid}) runs but does not answer on port {port}; "
                f"see {log_file}"
            )
        return DbProcess(pid, port, data_dir, log_file)
    if _port_taken(port):
        raise RuntimeError(
            f"port {port} is taken by another process; set AIWM_DB_PORT to a free port "
            "or MONGODB_URI to use that server"
        )
    for d in (data_dir, pid_file.parent, log_file.parent):
        d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", "import sys; from secantus.cli import main; sys.exit(main())",
           "--host", "127.0.0.1", "--port", str(port), "--storage-path", str(data_dir)]
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI, and Ctrl-C in its terminal
        )
    pid_file.write_text(f"{proc.pid} {port}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file.unlink(missing_ok=True)
            raise RuntimeError(
                f"embedded database exited with code {proc.returncode}; see {log_file}"
            )
        if ping(port, timeout=0.5):
            return DbProcess(proc.pid, port, data_dir, log_file)
        time.sleep(0.1)
    stop(home)
    raise RuntimeError(f"embedded database did not answer within {timeout}s; see {log_file}")


def stop(home: Path, *, timeout: float = 15.0) -> bool:
    """Stop the embedded server (SIGTERM, then SIGKILL). False if none was running."""
    _, pid_file, _ = _paths(home)
    pid = running(home)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        _reap(pid)
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    pid_file.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass

"""The ``process`` runtime: the model server as a local subprocess, for hosts without Docker.

Each deployment has two files under ``<state dir>/deployments``: ``<name>.json`` (pid,
process start time, host port, argv, spec) and ``<name>.log`` (the server's stdout and
stderr). The child runs in its own session, so it outlives the agent; a new agent adopts it
when the pid still names the same process (same start time and command line).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from aiwm.protocol import DeploymentSpecData
from nodeside.handlers import CommandFailed
from nodeside.runtimes import (
    EXITED,
    RUNNING,
    Instance,
    free_port,
    safe_name,
    spec_digest,
    substitute,
)

log = logging.getLogger("aiwm.node.process")
# The agent's own secrets are no business of a model server.
_PRIVATE_ENV = {"NODE_TOKEN"}


class ProcessRuntime:
    name = "process"
    local_host = "127.0.0.1"

    def __init__(self, *, state_dir: Path, stop_grace: float = 10.0) -> None:
        self.dir = state_dir / "deployments"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stop_grace = stop_grace
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # ours, so they get reaped

    def present(self) -> bool:
        return True

    def _paths(self, deployment_id: str) -> tuple[Path, Path]:
        base = self.dir / safe_name(deployment_id)
        return base.with_suffix(".json"), base.with_suffix(".log")

    def _load(self, deployment_id: str) -> dict[str, Any] | None:
        state_path, _ = self._paths(deployment_id)
        try:
            state: dict[str, Any] = json.loads(state_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return state if state.get("deploymentId") == deployment_id else None

    def _alive(self, state: dict[str, Any]) -> bool:
        child = self._children.get(state["deploymentId"])
        if child is not None and child.pid == state["pid"]:
            return child.poll() is None  # poll() also reaps it once it has exited
        try:
            proc = psutil.Process(state["pid"])
            # A pid can be reused: the start time tells our process apart (to the clock
            # tick). Not the command line: a wrapper that execs the server (`sh -c "...;
            # exec server"`) changes it and is still ours.
            if abs(proc.create_time() - state["createTime"]) >= 0.1:
                return False
            if proc.status() == psutil.STATUS_ZOMBIE:
                _reap(state["pid"])
                return False
            return True
        except psutil.ZombieProcess:  # before NoSuchProcess: it is one
            _reap(state["pid"])
            return False
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def _instance(self, state: dict[str, Any]) -> Instance:
        return Instance(
            deployment_id=state["deploymentId"], runtime="process",
            status=RUNNING if self._alive(state) else EXITED, host_port=state["hostPort"],
            pid=state["pid"], started_at=state["startedAt"],
            name=f"aiwm-{safe_name(state['deploymentId'])}", model_dir=state.get("modelDir"),
            spec_digest=_digest(state.get("spec")),
        )

    # --- Runtime -----------------------------------------------------------------------

    async def find(self, deployment_id: str) -> Instance | None:
        state = self._load(deployment_id)
        return self._instance(state) if state is not None else None

    async def start(self, spec: DeploymentSpecData, *, model_dir: Path | None) -> Instance:
        if not spec.command:
            raise CommandFailed("invalid_spec", "the process runtime needs a command")
        port = free_port()
        models = str(model_dir) if model_dir is not None else ""
        argv = substitute(spec.command, port=port, model_dir=models)
        env = {k: v for k, v in os.environ.items() if k.upper() not in _PRIVATE_ENV}
        env.update(spec.env)
        env["PORT"] = str(port)
        if model_dir is not None:
            env["MODEL_DIR"] = models
        state_path, log_path = self._paths(spec.deploymentId)
        try:
            with open(log_path, "ab") as out:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # outlives the agent
        except OSError as e:  # no such program, not executable
            raise CommandFailed("start_failed", f"cannot run {argv[0]}: {e}") from None
        self._children[spec.deploymentId] = child
        try:
            created = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            created = time.time()  # gone already; the readiness check will say so
        state = {"deploymentId": spec.deploymentId, "pid": child.pid, "createTime": created,
                 "hostPort": port, "argv": argv, "spec": spec.model_dump(mode="json"),
                 "modelDir": models or None,
                 "startedAt": dt.datetime.now(dt.UTC).isoformat()}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_path)  # never a torn state file after a crash
        log.info("started %s as pid %d on port %d", spec.deploymentId, child.pid, port)
        return self._instance(state)

    async def remove(self, deployment_id: str) -> Instance | None:
        state = self._load(deployment_id)
        if state is None:
            return None
        before = self._instance(state)
        if before.running:
            await self._terminate(state)
        self._children.pop(deployment_id, None)
        for path in self._paths(deployment_id):
            path.unlink(missing_ok=True)
        return before

    async def _terminate(self, state: dict[str, Any]) -> None:
        """SIGTERM to the process group (the server and whatever it started), SIGKILL to
        what is left after the grace period."""
        pid = state["pid"]
        group = _group_of(pid)
        _signal(pid, group, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        while self._alive(state) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _signal(pid, group, signal.SIGKILL)  # helpers of the server may still be around
        child = self._children.get(state["deploymentId"])
        if child is not None:
            await asyncio.to_thread(child.wait)
            return
        # Not our child (adopted after a restart): a kill lands when the kernel next
        # schedules it; answer "stopped" only once it has.
        deadline = time.monotonic() + 5.0
        while self._alive(state) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def logs(self, deployment_id: str, tail: int) -> list[str] | None:
        if self._load(deployment_id) is None:
            return None
        return await asyncio.to_thread(tail_lines, self._paths(deployment_id)[1], tail)

    async def stats(self, deployment_id: str) -> dict[str, Any] | None:
        state = self._load(deployment_id)
        if state is None:
            return None
        if not self._alive(state):
            return {"cpuPercent": None, "memoryBytes": None}
        return await asyncio.to_thread(_usage, state["pid"])

    async def list(self) -> list[Instance]:
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                found.append(self._instance(json.loads(path.read_text())))
            except (ValueError, KeyError, OSError):
                log.warning("ignoring an unreadable deployment state file %s", path)
        return found


def _digest(spec: Any) -> str | None:
    try:
        return spec_digest(spec) if isinstance(spec, dict) else None
    except ValueError:  # a spec this agent cannot read back: say nothing about it
        return None


def _reap(pid: int) -> None:
    """Collect a dead child of this process that no Popen knows of: one started by this
    same process before ``system.restart`` exec'd a new agent into it."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours: its parent (or init) collects it


def _group_of(pid: int) -> int | None:
    """The process group to signal: the child's own (it leads one, started in a new
    session); None if it does not lead one, so that only the process itself is hit."""
    try:
        return pid if os.getpgid(pid) == pid else None
    except ProcessLookupError:
        return None


def _signal(pid: int, group: int | None, sig: signal.Signals) -> None:
    try:
        if group is not None:
            os.killpg(group, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _usage(pid: int, sample: float = 0.2) -> dict[str, Any]:
    """CPU percent (of one core) and resident memory of the server and its children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            p.cpu_percent(None)  # the first call only starts the measurement
        time.sleep(sample)
        cpu = memory = 0.0
        for p in procs:
            try:
                cpu += p.cpu_percent(None)
                memory += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return {"cpuPercent": round(cpu, 2), "memoryBytes": int(memory)}
    except psutil.NoSuchProcess:
        return {"cpuPercent": None, "memoryBytes": None}


def tail_lines(path: Path, count: int, block: int = 64 * 1024) -> list[str]:
    """The last ``count`` lines of a file, reading from the end (logs grow large)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= count:
                start = max(0, end - block)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()[-count:]

"""Where deployments' model servers run: ``docker`` (containers) and ``process`` (plain
subprocesses, for hosts without Docker).

A runtime starts, finds, stops and inspects one deployment's server. It keeps no state in
memory that an agent restart would lose: Docker containers are found by label, processes by
a small JSON file per deployment. Deciding when a server is ready, and what to tell the
controller, is the caller's job (:mod:`nodeside.deployments`).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiwm.protocol import DeploymentSpecData

# Statuses a runtime reports; docker's own words, which the process runtime reuses.
RUNNING = "running"
EXITED = "exited"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass
class Instance:
    """One deployment's server as a runtime sees it now."""

    deployment_id: str
    runtime: str
    status: str  # running, exited, restarting, created, dead
    host_port: int | None = None
    container_id: str | None = None  # docker
    pid: int | None = None  # process
    started_at: str | None = None  # ISO 8601, UTC
    restart_count: int = 0
    name: str | None = None
    image: str | None = None
    model_dir: str | None = None  # the model folder the server was given, on this host
    spec_digest: str | None = None  # spec_digest() of the spec it was started from
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.status == RUNNING


class Runtime(Protocol):
    name: str
    local_host: str  # where the agent itself reaches a server's host port

    def present(self) -> bool:
        """Whether this runtime can exist on this host at all (Docker: its socket is
        there). Lookups by id skip absent runtimes instead of failing."""
        ...

    async def find(self, deployment_id: str) -> Instance | None:
        """The deployment's server, running or not; None if this runtime has none."""
        ...

    async def start(self, spec: DeploymentSpecData, *, model_dir: Path | None) -> Instance:
        """Start a new server; the caller has removed any old one. It may not listen yet.
        ``model_dir``: the spec's model on this host (checked by the caller), if any."""
        ...

    async def remove(self, deployment_id: str) -> Instance | None:
        """Stop (SIGTERM, then SIGKILL after the grace period) and forget the server.
        Returns what was there before, or None."""
        ...

    async def logs(self, deployment_id: str, tail: int) -> list[str] | None:
        ...

    async def stats(self, deployment_id: str) -> dict[str, Any] | None:
        """``{"cpuPercent", "memoryBytes"}`` (None while not running); None if unknown."""
        ...

    async def list(self) -> list[Instance]:
        ...


def safe_name(deployment_id: str) -> str:
    """A container or file name for the deployment: the id itself when it is a valid name,
    else the id's safe characters plus a hash, so two ids never share a name."""
    if _SAFE_NAME.fullmatch(deployment_id):
        return deployment_id
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", deployment_id)[:60].strip(".-") or "d"
    return f"{cleaned}-{hashlib.sha256(deployment_id.encode()).hexdigest()[:16]}"


def spec_digest(spec: DeploymentSpecData | dict[str, Any]) -> str:
    """A short digest of everything in a spec: a server started from another spec (a new
    image, command, or model version) is not the one a ``deployment.create`` asks for."""
    if isinstance(spec, dict):
        spec = DeploymentSpecData.model_validate(spec)
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def substitute(args: list[str], *, port: int, model_dir: str) -> list[str]:
    return [a.replace("{port}", str(port)).replace("{model_dir}", model_dir) for a in args]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])

"""The ``docker`` runtime: one container per deployment, found again by its labels.

The Docker SDK blocks, so every call goes through :func:`asyncio.to_thread`. Containers
carry ``aiwm.deployment=<id>`` and ``aiwm.managed=true``; that is all an agent needs to
adopt them after a restart. ``unless-stopped`` lets Docker bring a server back after a
crash or a reboot without the agent; ``init`` makes stop fast (tini passes SIGTERM on).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.utils import parse_repository_tag

from aiwm.protocol import DeploymentSpecData
from nodeside.handlers import CommandFailed
from nodeside.runtimes import RUNNING, Instance, safe_name, spec_digest, substitute

log = logging.getLogger("aiwm.node.docker")
LABEL = "aiwm.deployment"
MANAGED = "aiwm.managed"
SPEC_LABEL = "aiwm.spec"  # spec_digest() of the spec the container was made from
PORT_LABEL = "aiwm.port"  # the container port, to read the host port back after a restart
MODELS_IN_CONTAINER = "/models"
T = TypeVar("T")


class DockerRuntime:
    name = "docker"

    def __init__(self, *, socket_path: str, publish_host: str = "0.0.0.0",
                 real_gpus: Callable[[], bool] = lambda: False, stop_grace: float = 10.0) -> None:
        self.socket_path = socket_path
        self.publish_host = publish_host
        self.real_gpus = real_gpus
        self.stop_grace = stop_grace
        self._client: docker.DockerClient | None = None
        # A wildcard publish address is reachable on loopback; a specific one only there.
        self.local_host = "127.0.0.1" if publish_host in ("0.0.0.0", "::", "") else publish_host

    def present(self) -> bool:
        return Path(self.socket_path).exists()

    # --- the one seam where Docker is called -------------------------------------------

    def _connect(self) -> docker.DockerClient:
        if self._client is None:
            if not Path(self.socket_path).exists():
                raise CommandFailed("docker_unavailable", f"no Docker socket at {self.socket_path}")
            try:
                client = docker.DockerClient(base_url=f"unix://{self.socket_path}",
                                             timeout=int(max(60.0, self.stop_grace + 30)))
                client.ping()
            except docker.errors.DockerException as e:
                raise CommandFailed("docker_unavailable",
                                    f"Docker does not answer on {self.socket_path}: {e}") from None
            self._client = client
        return self._client

    async def _call(self, fn: Callable[[docker.DockerClient], T]) -> T:
        def run() -> T:
            try:
                return fn(self._connect())
            except requests.exceptions.ConnectionError as e:
                self._client = None  # dockerd went away: connect afresh next time
                raise CommandFailed("docker_unavailable", f"lost the Docker daemon: {e}") from None

        return await asyncio.to_thread(run)

    # --- Runtime -----------------------------------------------------------------------

    async def find(self, deployment_id: str) -> Instance | None:
        def find(client: docker.DockerClient) -> Instance | None:
            container = _container(client, deployment_id)
            return _instance(container) if container is not None else None

        return await self._call(find)

    async def start(self, spec: DeploymentSpecData, *, model_dir: Path | None) -> Instance:
        if not spec.image:
            raise CommandFailed("invalid_spec", "the docker runtime needs an image")
        return await self._call(lambda client: self._start(client, spec, model_dir))

    def _start(self, client: docker.DockerClient, spec: DeploymentSpecData,
               model_dir: Path | None) -> Instance:
        assert spec.image is not None
        _ensure_image(client, spec.image)
        name = f"aiwm-{safe_name(spec.deploymentId)}"
        env = {**spec.env, "PORT": str(spec.port)}
        volumes: dict[str, dict[str, str]] = {}
        if model_dir is not None:
            env["MODEL_DIR"] = MODELS_IN_CONTAINER
            volumes[str(model_dir)] = {"bind": MODELS_IN_CONTAINER, "mode": "ro"}
        options: dict[str, Any] = {
            "command": substitute(spec.command, port=spec.port,
                                  model_dir=MODELS_IN_CONTAINER) or None,
            "environment": env, "volumes": volumes, "name": name, "detach": True, "init": True,
            "labels": {LABEL: spec.deploymentId, MANAGED: "true", PORT_LABEL: str(spec.port),
                       SPEC_LABEL: spec_digest(spec)},
            "ports": {f"{spec.port}/tcp": (self.publish_host, None)},  # None: any free port
            "restart_policy": {"Name": "unless-stopped"},
        }
        if spec.memoryMb:
            options["mem_limit"] = f"{spec.memoryMb}m"
        if spec.cpus:
            options["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.gpus and self.real_gpus():
            options["device_requests"] = [docker.types.DeviceRequest(count=spec.gpus,
                                                                     capabilities=[["gpu"]])]
        elif spec.gpus:
            log.info("deployment %s asks for %d GPU(s); this node has no real ones, so none "
                     "are passed in", spec.deploymentId, spec.gpus)
        _remove_named(client, name)  # a leftover that lost its labels would block the name
        try:
            container = client.containers.run(spec.image, **options)
        except docker.errors.APIError as e:
            # Created but not started (e.g. the command does not exist): leave nothing behind.
            _remove_named(client, name)
            raise CommandFailed("start_failed", f"Docker could not start {spec.image}: "
                                                f"{e.explanation or e}") from None
        container.reload()  # the host port is known only once it runs
        return _instance(container)

    async def remove(self, deployment_id: str) -> Instance | None:
        def remove(client: docker.DockerClient) -> Instance | None:
            container = _container(client, deployment_id)
            if container is None:
                return None
            before = _instance(container)
            try:
                if before.running:
                    container.stop(timeout=int(self.stop_grace))  # SIGTERM, then SIGKILL
                container.remove(force=True)
            except docker.errors.NotFound:
                pass  # removed meanwhile: what we wanted
            return before

        return await self._call(remove)

    async def logs(self, deployment_id: str, tail: int) -> list[str] | None:
        def logs(client: docker.DockerClient) -> list[str] | None:
            container = _container(client, deployment_id)
            if container is None:
                return None
            raw: bytes = container.logs(stdout=True, stderr=True, tail=tail)
            return raw.decode(errors="replace").splitlines()[-tail:]

        return await self._call(logs)

    async def stats(self, deployment_id: str) -> dict[str, Any] | None:
        def stats(client: docker.DockerClient) -> dict[str, Any] | None:
            container = _container(client, deployment_id)
            if container is None:
                return None
            if container.status != RUNNING:
                return {"cpuPercent": None, "memoryBytes": None}
            return _usage(container.stats(stream=False))

        return await self._call(stats)

    async def list(self) -> list[Instance]:
        def listed(client: docker.DockerClient) -> list[Instance]:
            return [_instance(c) for c in client.containers.list(
                all=True, filters={"label": f"{MANAGED}=true"}, ignore_removed=True)]

        return await self._call(listed)


def _container(client: docker.DockerClient, deployment_id: str) -> Container | None:
    # ignore_removed: one removed between the listing and its inspection is simply gone.
    found = client.containers.list(all=True, filters={"label": f"{LABEL}={deployment_id}"},
                                   ignore_removed=True)
    # Labels are exact, but a filter value with '=' in it could match loosely: check.
    found = [c for c in found if c.labels.get(LABEL) == deployment_id]
    return found[0] if found else None


def _remove_named(client: docker.DockerClient, name: str) -> None:
    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass


def _ensure_image(client: docker.DockerClient, image: str) -> None:
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    repository, tag = parse_repository_tag(image)
    log.info("pulling %s", image)
    try:
        client.images.pull(repository, tag=tag or "latest")
    except docker.errors.APIError as e:
        raise CommandFailed("image_not_found", f"image {image} is not on this node and cannot "
                                               f"be pulled: {e.explanation or e}") from None


def _instance(container: Container) -> Instance:
    attrs = container.attrs
    state = attrs.get("State") or {}
    port = container.labels.get(PORT_LABEL)
    bindings = ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{port}/tcp") or []
    host_ports = [int(b["HostPort"]) for b in bindings if b.get("HostPort")]
    return Instance(
        deployment_id=container.labels.get(LABEL, ""), runtime="docker",
        status=state.get("Status") or container.status,
        host_port=host_ports[0] if host_ports else None, container_id=container.id,
        started_at=iso_utc(state.get("StartedAt")), restart_count=int(attrs.get("RestartCount") or 0),
        name=container.name, image=(attrs.get("Config") or {}).get("Image"),
        model_dir=next((m.get("Source") for m in attrs.get("Mounts") or []
                        if m.get("Destination") == MODELS_IN_CONTAINER), None),
        spec_digest=container.labels.get(SPEC_LABEL),
    )


def iso_utc(docker_time: str | None) -> str | None:
    """Docker's nanosecond timestamps as ISO 8601 that Python (and JSON readers) parse;
    None for Docker's zero time ("never started")."""
    if not docker_time or docker_time.startswith("0001-"):
        return None
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", docker_time).replace("Z", "+00:00")
    try:
        return dt.datetime.fromisoformat(trimmed).astimezone(dt.UTC).isoformat()
    except ValueError:
        return docker_time


def _usage(stats: dict[str, Any]) -> dict[str, Any]:
    """CPU percent as ``docker stats`` computes it (of one core: may exceed 100 on many)
    and memory without the page cache."""
    cpu, pre = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - \
        (pre.get("cpu_usage") or {}).get("total_usage", 0)
    system_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
    cores = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1
    percent = cpu_delta / system_delta * cores * 100.0 if system_delta > 0 and cpu_delta > 0 else 0.0
    memory = stats.get("memory_stats") or {}
    usage = memory.get("usage")
    if usage is not None:
        detail = memory.get("stats") or {}
        usage -= detail.get("inactive_file", detail.get("cache", 0))  # cgroup v2, v1
    return {"cpuPercent": round(percent, 2), "memoryBytes": int(usage) if usage is not None else None}

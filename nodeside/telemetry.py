"""What the agent reports: system facts at register, metrics on a timer.

CPU, RAM and disk come from psutil; GPUs from NVML (nvidia-ml-py). GPU_MOCK_MODE reports
two fixed fake GPUs, each marked ``mock: true``, for hosts without one.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("aiwm.node.telemetry")
GIB = 1024**3
MOCK_GPUS = [
    {"index": i, "uuid": f"GPU-mock-{i:04d}", "name": "Mock NVIDIA H100 80GB HBM3",
     "memoryTotal": 80 * GIB, "mock": True}
    for i in range(2)
]


class Gpus:
    """NVML when it works; mock GPUs when asked; nothing otherwise (with a reason)."""

    def __init__(self, *, mock: bool) -> None:
        self.mock = mock
        self.error: str | None = None
        self._nvml: Any = None
        if mock:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # no driver, no library, no GPU
            self.error = f"NVML unavailable: {e}"

    def _handles(self) -> list[tuple[int, Any]]:
        """(index, NVML handle) of every GPU; none without NVML."""
        if self._nvml is None:
            return []
        nv = self._nvml
        return [(i, nv.nvmlDeviceGetHandleByIndex(i)) for i in range(nv.nvmlDeviceGetCount())]

    def devices(self) -> list[dict[str, Any]]:
        if self.mock:
            return [dict(g) for g in MOCK_GPUS]
        nv = self._nvml
        return [{"index": i, "uuid": _text(nv.nvmlDeviceGetUUID(h)),
                 "name": _text(nv.nvmlDeviceGetName(h)),
                 "memoryTotal": int(nv.nvmlDeviceGetMemoryInfo(h).total), "mock": False}
                for i, h in self._handles()]

    def metrics(self) -> list[dict[str, Any]]:
        if self.mock:
            return [{"index": g["index"], "utilization": 0.0, "memoryUsed": 0,
                     "memoryTotal": g["memoryTotal"], "temperature": 30.0, "powerWatts": 70.0,
                     "mock": True} for g in MOCK_GPUS]
        nv = self._nvml
        out = []
        for i, h in self._handles():
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = nv.nvmlDeviceGetUtilizationRates(h)
            out.append({
                "index": i, "utilization": float(util.gpu), "memoryUsed": int(mem.used),
                "memoryTotal": int(mem.total),
                "temperature": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                "powerWatts": nv.nvmlDeviceGetPowerUsage(h) / 1000.0, "mock": False,
            })
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ip() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def docker_runtime(socket_path: str) -> dict[str, Any]:
    """Whether Docker answers on ``socket_path``, and its version."""
    if not Path(socket_path).exists():
        return {"type": "docker", "available": False, "error": f"no socket at {socket_path}"}
    try:
        import docker

        client = docker.DockerClient(base_url=f"unix://{socket_path}", timeout=3)
        version = client.version().get("Version")
        client.close()
        return {"type": "docker", "available": True, "version": version}
    except Exception as e:
        return {"type": "docker", "available": False, "error": str(e)[:200]}


def containers(socket_path: str) -> list[dict[str, Any]]:
    if not Path(socket_path).exists():
        return []
    try:
        import docker

        client = docker.DockerClient(base_url=f"unix://{socket_path}", timeout=3)
        found = [{"id": c.short_id, "name": c.name, "status": c.status,
                  "image": (c.image.tags or [c.image.short_id])[0] if c.image else None,
                  "deploymentId": c.labels.get("aiwm.deployment")}
                 for c in client.containers.list(all=True)]
        client.close()
        return found
    except Exception as e:
        log.debug("cannot list containers: %s", e)
        return []


def system_info(*, hostname: str, gpus: Gpus, docker_socket: str) -> dict[str, Any]:
    uname = platform.uname()
    return {
        "hostname": hostname,
        "ipAddress": _ip(),
        "os": {"system": uname.system, "release": uname.release, "version": uname.version,
               "machine": uname.machine},
        "cpuCores": psutil.cpu_count(logical=True) or 0,
        "cpuModel": platform.processor() or uname.machine,
        "ramTotal": int(psutil.virtual_memory().total),
        "gpuDevices": gpus.devices(),
        "containerRuntime": docker_runtime(docker_socket),
    }


def metrics(*, gpus: Gpus, docker_socket: str, disk_path: str = "/") -> dict[str, Any]:
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(disk_path)
    return {
        "cpuPercent": float(psutil.cpu_percent(interval=None)),
        "ramUsed": int(mem.total - mem.available), "ramTotal": int(mem.total),
        "diskUsed": int(disk.used), "diskTotal": int(disk.total),
        "gpus": gpus.metrics(),
        "containers": containers(docker_socket),
    }


def disk_check(path: str, *, min_free_bytes: int = GIB) -> dict[str, Any]:
    usage = psutil.disk_usage(path)
    return {"ok": usage.free >= min_free_bytes, "path": path, "freeBytes": int(usage.free),
            "totalBytes": int(usage.total), "minFreeBytes": min_free_bytes}


def uptime_seconds() -> float:
    import time

    return max(0.0, time.time() - psutil.Process(os.getpid()).create_time())

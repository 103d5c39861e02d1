"""Commands the agent runs, keyed by ``<resource>.<action>``.

The system commands live here; deployments and models in :mod:`nodeside.deployments` and
:mod:`nodeside.models`, which import :class:`CommandFailed` from this module (so this one
imports them only for type checking).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from nodeside import telemetry

if TYPE_CHECKING:
    from nodeside.deployments import DeploymentHandlers
    from nodeside.models import ModelHandlers

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# Sends a node->controller frame (kind, data) if connected; drops it otherwise.
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)
# The id of the command a handler runs for (set by the agent in the command's own task):
# what a handler's progress frames name, so the controller shows them on that command.
CURRENT_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aiwm_command", default=None)


class CommandFailed(Exception):
    """A handler's failure with a stable code, sent back as the command's error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse(model: type[M], data: dict[str, Any]) -> M:
    """A command's data as its protocol model; ``invalid_spec`` if it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'data'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise CommandFailed("invalid_spec", problems) from None


class Commands:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    def names(self) -> list[str]:
        return sorted(self._handlers)

    async def run(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        handler = self._handlers.get(kind)
        if handler is None:
            raise CommandFailed("unsupported_command",
                                f"this agent cannot run {kind}; it runs {', '.join(self.names())}")
        return await handler(data)


@dataclass
class SystemHandlers:
    gpus: telemetry.Gpus
    docker_socket: str
    state_dir: str
    restart: Callable[[], None]

    async def health_check(self, data: dict[str, Any]) -> dict[str, Any]:
        """Real checks: disk space, Docker reachable, GPUs visible."""
        disk = telemetry.disk_check(self.state_dir)
        docker = telemetry.docker_runtime(self.docker_socket)
        devices = self.gpus.devices()
        gpu: dict[str, Any] = {"ok": bool(devices), "count": len(devices), "mock": self.gpus.mock}
        if not devices:
            gpu["error"] = self.gpus.error or "no GPU visible"
        checks = {"disk": disk, "docker": {"ok": docker["available"], **docker}, "gpus": gpu}
        return {"healthy": all(c["ok"] for c in checks.values()), "checks": checks}

    async def restart_agent(self, data: dict[str, Any]) -> dict[str, Any]:
        self.restart()  # scheduled: the result goes out first
        return {"restarting": True}


def default_commands(system: SystemHandlers, *, deployments: DeploymentHandlers | None = None,
                     models: ModelHandlers | None = None) -> Commands:
    commands = Commands()
    commands.register("system.healthCheck", system.health_check)
    commands.register("system.restart", system.restart_agent)
    if deployments is not None:
        commands.register("deployment.create", deployments.create)
        commands.register("deployment.stop", deployments.stop)
        commands.register("deployment.restart", deployments.restart)
        commands.register("deployment.getLogs", deployments.get_logs)
        commands.register("deployment.getStats", deployments.get_stats)
        commands.register("deployment.request", deployments.request)
    if models is not None:
        commands.register("model.download", models.download)
        commands.register("model.delete", models.delete)
        commands.register("model.prune", models.prune)
    return commands

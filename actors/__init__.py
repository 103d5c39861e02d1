"""Ray actors. The classes are plain; this module is the one place that makes them remote
and the one wrapper that owns calls into them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.registry import Registry
from aiwm.errors import AiwmError, Unavailable
from aiwm.settings import Settings

NAMESPACE = "aiwm"
REGISTRY_NAME = "registry"

RegistryActor = ray.remote(Registry)


def ensure_registry(settings: Settings, *, replace: bool = False) -> Any:
    """Get the detached ``registry`` actor, creating it (or replacing it) as needed.

    ``replace`` starts a fresh one with ``settings``: ``aiwm up`` uses it so a changed
    configuration takes effect on a cluster that outlived the previous run.
    """
    if replace:
        try:
            ray.kill(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # none yet
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the name is released asynchronously
            try:
                ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.1)
    return RegistryActor.options(  # type: ignore[attr-defined]
        name=REGISTRY_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,  # a write is never replayed behind the caller's back
        num_cpus=0,
    ).remote(settings=settings)


class Writer(Protocol):
    """What the API edge needs from the Registry, local or remote."""

    async def call(self, method: str, *args: Any) -> Any: ...

    async def ping(self, timeout: float) -> None: ...


class RegistryClient:
    """Calls the Registry actor; domain errors come back as themselves, death as 503."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args)
        except RayTaskError as e:
            if isinstance(e.cause, AiwmError):
                raise e.cause from None
            raise
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            raise Unavailable(
                f"registry actor unavailable ({type(e).__name__}); it restarts by itself, retry"
            ) from None

    async def ping(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.call("ping"), timeout)
        except TimeoutError:
            raise Unavailable(f"registry actor did not answer within {timeout}s") from None


class LocalWriter:
    """The same interface around an in-process Registry: for plain uvicorn and unit tests."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self._registry, method)(*args)

    async def ping(self, timeout: float) -> None:
        await self._registry.ping()


__all__ = [
    "NAMESPACE",
    "REGISTRY_NAME",
    "LocalWriter",
    "Registry",
    "RegistryActor",
    "RegistryClient",
    "Writer",
    "ensure_registry",
]

"""Ray actors. The classes are plain; this module is the one place that makes them remote
and the one wrapper that owns calls into them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.node_proxy import NodeProxy
from actors.registry import Registry
from aiwm.errors import AiwmError, Unavailable
from aiwm.settings import Settings

NAMESPACE = "aiwm"
REGISTRY_NAME = "registry"

RegistryActor = ray.remote(Registry)
NodeProxyActor = ray.remote(NodeProxy)


def node_actor_name(node_id: str) -> str:
    return f"node:{node_id}"


def ensure_node_proxy(settings: Settings, node_id: str, org_id: str) -> Any:
    """The detached ``node:<id>`` actor, created on the node's first connection."""
    return NodeProxyActor.options(  # type: ignore[attr-defined]
        name=node_actor_name(node_id),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        num_cpus=0,
    ).remote(settings=settings, node_id=node_id, org_id=org_id)


class NodeSessions:
    """Ends a node's live session (for the Registry, when a token is revoked)."""

    async def close(self, node_id: str) -> None:
        try:
            handle = ray.get_actor(node_actor_name(node_id), namespace=NAMESPACE)
        except ValueError:
            return  # never connected: nothing to close
        await ActorClient(handle, "node proxy").call("revoke")


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
    ).remote(settings=settings, sessions=NodeSessions())


class Writer(Protocol):
    """What the API edge needs from the Registry, local or remote."""

    async def call(self, method: str, *args: Any) -> Any: ...

    async def ping(self, timeout: float) -> None: ...


class ActorClient:
    """Calls an actor; domain errors come back as themselves, death as 503."""

    def __init__(self, handle: Any, what: str = "registry") -> None:
        self._handle = handle
        self._what = what

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args)
        except RayTaskError as e:
            if isinstance(e.cause, AiwmError):
                raise e.cause from None
            raise
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            raise Unavailable(
                f"{self._what} actor unavailable ({type(e).__name__}); it restarts by itself, retry"
            ) from None

    async def ping(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.call("ping"), timeout)
        except TimeoutError:
            raise Unavailable(f"{self._what} actor did not answer within {timeout}s") from None


RegistryClient = ActorClient


class LocalWriter:
    """The same interface around an in-process Registry: for plain uvicorn and unit tests."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self._registry, method)(*args)

    async def ping(self, timeout: float) -> None:
        await self._registry.ping()


__all__ = [
    "ActorClient",
    "NAMESPACE",
    "NodeProxy",
    "NodeProxyActor",
    "NodeSessions",
    "ensure_node_proxy",
    "node_actor_name",
    "REGISTRY_NAME",
    "LocalWriter",
    "Registry",
    "RegistryActor",
    "RegistryClient",
    "Writer",
    "ensure_registry",
]

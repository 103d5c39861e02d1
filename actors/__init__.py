"""Ray actors. The classes are plain; this module is the one place that makes them remote
and the one wrapper that owns calls into them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.channel import HOST_METHODS, ChannelClient, NoConnection, NotJson
from actors.node_host import NodeHost, node_shard_of
from actors.node_proxy import NodeProxy
from actors.orchestrator import ExecutionOrchestrator
from actors.registry import Registry
from aiwm.errors import AiwmError, Unavailable
from aiwm.logs import call_kwargs, configure_for, traced_methods
from aiwm.settings import Settings

log = logging.getLogger("aiwm.actors")
NAMESPACE = "aiwm"
REGISTRY_NAME = "registry"
ORCHESTRATOR_NAME = "orchestrator"
NODE_HOST_PREFIX = "nodes:"


def _actor(cls: type, process: Callable[[dict[str, Any]], str]) -> Any:
    """``cls`` made a Ray actor: its methods take the caller's correlation id
    (:func:`aiwm.logs.traced_methods`) and its process logs as AIWM does (aiwm/logs.py),
    named ``process(constructor kwargs)``. The plain class stays free of both, for tests."""
    traced = traced_methods(cls)
    init = vars(cls)["__init__"]

    @functools.wraps(init)
    def __init__(self: Any, **kwargs: Any) -> None:
        configure_for(kwargs["settings"], process(kwargs))
        init(self, **kwargs)

    return ray.remote(type(cls.__name__, (traced,), {
        "__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}))


RegistryActor = _actor(Registry, lambda kw: REGISTRY_NAME)
NodeHostActor = _actor(NodeHost, lambda kw: f"{NODE_HOST_PREFIX}{kw['shard']}")
OrchestratorActor = _actor(ExecutionOrchestrator, lambda kw: ORCHESTRATOR_NAME)


def ensure_orchestrator(settings: Settings, *, replace: bool = False) -> Any:
    """The detached ``orchestrator`` actor (created, or replaced with ``settings``). It
    reloads unfinished executions from MongoDB when it starts, after a crash included."""
    if replace:
        release(ORCHESTRATOR_NAME)
    return OrchestratorActor.options(  # type: ignore[attr-defined]
        name=ORCHESTRATOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,  # a create or cancel is never replayed behind the caller's back
        max_concurrency=10_000,  # waits and step tasks are many and mostly idle
        num_cpus=0,
    ).remote(settings=settings, autostart=True)


def orchestrator_client() -> ActorClient:
    """The orchestrator, looked up by name (again after it is replaced). Only ``deploy``
    creates it, so a caller never starts one with settings of its own."""

    def lookup() -> Any:
        return ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)

    return ActorClient(None, "orchestrator", resolve=lookup)  # looked up at first use


def ensure_node_host(settings: Settings, shard: int) -> Any:
    """The detached ``nodes:<shard>`` actor, created when a node of its shard first needs it."""
    return NodeHostActor.options(  # type: ignore[attr-defined]
        name=f"{NODE_HOST_PREFIX}{shard}",
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=10_000,  # every connected node keeps one long-poll `pull` open
        num_cpus=0,
    ).remote(settings=settings, shard=shard)


_HOSTS: dict[int, HostClient] = {}  # per process: handles survive actor restarts


def node_host_client(settings: Settings, shard: int) -> HostClient:
    """The client of NodeHost ``shard``, one per process (it finds a replaced host again)."""
    if shard not in _HOSTS:
        _HOSTS[shard] = HostClient(ensure_node_host(settings, shard),
                                   resolve=functools.partial(ensure_node_host, settings, shard))
    return _HOSTS[shard]


class NodeClient:
    """One node's NodeProxy, inside the NodeHost of its shard."""

    def __init__(self, settings: Settings, node_id: str, org_id: str) -> None:
        self._host = node_host_client(settings, node_shard_of(node_id, settings.node_proxy_shards))
        self.node_id, self.org_id = node_id, org_id

    async def call(self, method: str, *args: Any) -> Any:
        return await self._host.call("call", self.node_id, self.org_id, method, *args)

    async def command(self, kind: str, data: dict[str, Any] | None, timeout: float) -> Any:
        """Send a command and wait for its result; NotFound for a node not in the org."""
        return await self._host.call("command", self.node_id, self.org_id, kind, data, timeout)


async def check_node_hosts(settings: Settings, timeout: float) -> None:
    """Every NodeHost answers within ``timeout`` (raises Unavailable otherwise)."""
    clients = [node_host_client(settings, shard) for shard in range(settings.node_proxy_shards)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.call("census") for c in clients)), timeout)
    except TimeoutError:
        raise Unavailable(f"a node host did not answer within {timeout}s") from None


class NodeSessions:
    """Ends a node's live session (for the Registry, when a token is revoked)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def close(self, node_id: str, org_id: str, deleted: bool = False) -> None:
        await NodeClient(self._settings, node_id, org_id).call("revoke", deleted)


def registry_client() -> ActorClient:
    """The Registry, looked up by name (again after it is replaced)."""

    def lookup() -> Any:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)

    return ActorClient(lookup(), "registry", resolve=lookup)


def release(name: str) -> None:
    """Kill the named detached actor, if there is one, and wait until its name is free."""
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the name is released asynchronously
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)


def release_node_hosts() -> None:
    """Kill every NodeHost (whatever the shard count was): their sessions and outboxes go;
    agents reconnect and are attached to new hosts."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE and actor["name"].startswith(NODE_HOST_PREFIX):
            release(actor["name"])


def ensure_registry(settings: Settings, *, replace: bool = False) -> Any:
    """Get the detached ``registry`` actor, creating it (or replacing it) as needed.

    ``replace`` starts a fresh one with ``settings``: ``aiwm up`` uses it so a changed
    configuration takes effect on a cluster that outlived the previous run.
    """
    if replace:
        release(REGISTRY_NAME)
    return RegistryActor.options(  # type: ignore[attr-defined]
        name=REGISTRY_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,  # a write is never replayed behind the caller's back
        num_cpus=0,
    ).remote(settings=settings, sessions=NodeSessions(settings))


class Writer(Protocol):
    """What the API edge needs from the Registry, local or remote."""

    async def call(self, method: str, *args: Any) -> Any: ...

    async def ping(self, timeout: float) -> None: ...


class ActorClient:
    """Calls an actor; domain errors come back as themselves, death as 503.

    ``resolve`` looks the actor up again: after a call finds it dead for good (it was
    replaced, e.g. by ``aiwm up`` on a running cluster), the next call uses the new one.
    The failed call itself is not retried: it may have run before the actor died.
    """

    def __init__(self, handle: Any, what: str = "registry",
                 resolve: Callable[[], Any] | None = None) -> None:
        self._handle = handle
        self._what = what
        self._resolve = resolve

    async def call(self, method: str, *args: Any) -> Any:
        if self._handle is None and self._resolve is not None:
            try:
                self._handle = self._resolve()
            except ValueError:  # no actor by that name (yet): not started, or being replaced
                raise Unavailable(f"the {self._what} actor is not running; `aiwm up` starts "
                                  "it") from None
        try:
            return await getattr(self._handle, method).remote(*args, **call_kwargs())
        except RayTaskError as e:
            if isinstance(e.cause, AiwmError):
                raise e.cause from None
            raise
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            if isinstance(e, ActorDiedError) and self._resolve is not None:
                self._handle = None
            raise Unavailable(
                f"{self._what} actor unavailable ({type(e).__name__}); it restarts by itself, retry"
            ) from None

    async def ping(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.call("ping"), timeout)
        except TimeoutError:
            raise Unavailable(f"{self._what} actor did not answer within {timeout}s") from None




class HostClient(ActorClient):
    """A NodeHost: calls in ``HOST_METHODS`` over its direct channel (actors/channel.py),
    everything else, and everything while the channel cannot be reached, through Ray."""

    RAY_ONLY_FOR = 10.0  # seconds of Ray-only calls after the channel could not be reached

    def __init__(self, handle: Any, resolve: Callable[[], Any]) -> None:
        super().__init__(handle, "node host", resolve=resolve)
        self._channel: ChannelClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ray_until = 0.0

    async def _locate(self) -> dict[str, Any]:
        return await super().call("channel")  # type: ignore[no-any-return]

    async def call(self, method: str, *args: Any) -> Any:
        if method in HOST_METHODS and time.monotonic() >= self._ray_until:
            loop = asyncio.get_running_loop()
            if self._channel is None or self._loop is not loop:  # a client serves one loop
                self._channel, self._loop = ChannelClient(self._locate), loop
            try:
                return await self._channel.request(method, list(args))
            except NotJson:
                pass
            except NoConnection as e:
                log.warning("node host channel unreachable (%s); using Ray calls for %gs",
                            e, self.RAY_ONLY_FOR)
                self._ray_until = time.monotonic() + self.RAY_ONLY_FOR
        return await super().call(method, *args)


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
    "NodeClient",
    "NodeHost",
    "NodeHostActor",
    "NodeProxy",
    "NodeSessions",
    "ORCHESTRATOR_NAME",
    "ExecutionOrchestrator",
    "OrchestratorActor",
    "ensure_orchestrator",
    "orchestrator_client",
    "check_node_hosts",
    "ensure_node_host",
    "node_shard_of",
    "REGISTRY_NAME",
    "LocalWriter",
    "Registry",
    "RegistryActor",
    "Writer",
    "ensure_registry",
    "registry_client",
    "release",
    "release_node_hosts",
]

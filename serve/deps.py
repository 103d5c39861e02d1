"""Request-scoped dependencies: the app's shared state and the calling principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from actors import NodeClient, Writer
from aiwm.auth import Principal, Role, VerifiedTokens
from aiwm.catalog import PageCache
from aiwm.coalesce import Coalescer
from aiwm.errors import Unauthorized
from aiwm.settings import Settings
from aiwm.store import Store

if TYPE_CHECKING:
    from serve.frame_batch import FrameBatcher

_bearer = HTTPBearer(auto_error=False, description="A user JWT from `aiwm token create`")


class AppState:
    """What every route uses. The store opens lazily, inside the serving event loop."""

    def __init__(self, *, settings: Settings, writer: Writer,
                 node_host_check: Callable[[float], Awaitable[None]] | None = None,
                 orchestrator: Writer | None = None) -> None:
        self.settings = settings
        self.writer = writer
        self.orchestrator = orchestrator
        self.node_host_check = node_host_check
        self._store: Store | None = None
        self.pages = PageCache()
        self._tokens: VerifiedTokens | None = None
        self._frames: FrameBatcher | None = None
        self.stamp_reads: Coalescer[tuple[int, ...]] = Coalescer()
        self._nodes: dict[tuple[str, str], NodeClient] = {}

    async def node_hosts(self, timeout: float) -> None:
        """Every NodeHost answers (which also keeps their offline sweepers running)."""
        if self.node_host_check is not None:
            await self.node_host_check(timeout)

    def node(self, node_id: str, org_id: str) -> NodeClient:
        """The node's NodeProxy (in its NodeHost actor)."""
        key = (node_id, org_id)
        if key not in self._nodes:
            self._nodes[key] = NodeClient(self.settings, node_id, org_id)
        return self._nodes[key]

    @property
    def frames(self) -> FrameBatcher:
        """Batches node frames to the NodeHosts (made on first use, in the serving loop)."""
        if self._frames is None:
            from serve.frame_batch import FrameBatcher

            self._frames = FrameBatcher(self.settings)
        return self._frames

    @property
    def tokens(self) -> VerifiedTokens:
        if self._tokens is None:
            self._tokens = VerifiedTokens(self.settings.secret())
        return self._tokens

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.for_settings(self.settings)
        return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()


def state(request: Request) -> AppState:
    return request.app.state.aiwm  # type: ignore[no-any-return]


async def principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    if credentials is None:
        raise Unauthorized("missing bearer token; send 'Authorization: Bearer <token>'")
    return state(request).tokens.principal(credentials.credentials)


def role(needed: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits callers holding ``needed`` (or a higher role)."""

    async def check(p: Principal = Depends(principal)) -> Principal:
        p.require(needed)
        return p

    return check


viewer = role(Role.viewer)
operator = role(Role.operator)
admin = role(Role.admin)

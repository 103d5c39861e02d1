"""Request-scoped dependencies: the app's shared state and the calling principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from actors import ActorClient, Writer
from aiwm.auth import NodeIdentity, Principal, Role, decode_token
from aiwm.catalog import PageCache
from aiwm.coalesce import Coalescer
from aiwm.errors import Unauthorized
from aiwm.settings import Settings
from aiwm.store import Store

_bearer = HTTPBearer(auto_error=False, description="A user JWT from `aiwm token create`")


class AppState:
    """What every route uses. The store opens lazily, inside the serving event loop."""

    def __init__(self, *, settings: Settings, writer: Writer) -> None:
        self.settings = settings
        self.writer = writer
        self._store: Store | None = None
        self.pages = PageCache()
        self.stamp_reads: Coalescer[tuple[int, ...]] = Coalescer()
        self._node_proxies: dict[str, ActorClient] = {}

    def node_proxy(self, identity: NodeIdentity, create: Callable[[], Any]) -> ActorClient:
        """The node's NodeProxy actor (created by ``create`` the first time it is needed)."""
        client = self._node_proxies.get(identity.node_id)
        if client is None:
            client = self._node_proxies[identity.node_id] = ActorClient(create(), "node proxy")
        return client

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(
                uri=self.settings.database_uri, db_name=self.settings.database_name
            )
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
    return decode_token(credentials.credentials, secret=state(request).settings.secret())


def role(needed: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits callers holding ``needed`` (or a higher role)."""

    async def check(p: Principal = Depends(principal)) -> Principal:
        p.require(needed)
        return p

    return check


viewer = role(Role.viewer)
operator = role(Role.operator)
admin = role(Role.admin)

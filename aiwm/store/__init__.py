"""All MongoDB access: one client, one module per collection.

Open a :class:`Store` inside the event loop that will use it (the Serve replica's, the
actor's); PyMongo's async client binds to the loop it first runs in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pymongo
from pymongo import AsyncMongoClient

from aiwm.settings import Settings
from aiwm.store import (
    agents,
    conversations,
    deployments,
    events,
    executions,
    instructions,
    messages,
    model_versions,
    models,
    node_metrics,
    nodes,
    tools,
)
from aiwm.store.documents import Documents, db_errors, utcnow
from aiwm.store.events import Events
from aiwm.store.executions import Executions
from aiwm.store.model_versions import ModelVersions
from aiwm.store.node_metrics import NodeMetrics
from aiwm.store.stamps import Stamps

COLLECTIONS: dict[str, ModuleType] = {
    m.COLLECTION: m
    for m in (nodes, models, deployments, agents, instructions, tools, conversations, messages)
}
# Not catalog documents: append-only records, and executions (the orchestrator's own).
RECORDS: tuple[ModuleType, ...] = (events, node_metrics, executions, model_versions)


class Store:
    """The database of one AIWM installation."""

    def __init__(
        self,
        *,
        uri: str,
        db_name: str,
        server_selection_timeout_ms: int = 3000,
        retry_writes: bool = True,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            tz_aware=True,
            serverSelectionTimeoutMS=server_selection_timeout_ms,
            connectTimeoutMS=server_selection_timeout_ms,
            retryWrites=retry_writes,
            appname="aiwm",
        )
        self._db = self._client[db_name]
        self._clock = clock
        self._docs: dict[str, Documents] = {}
        self.stamps = Stamps(self._db)
        self.events = Events(self._db)
        self.node_metrics = NodeMetrics(self._db)
        self.executions = Executions(self._db)
        self.model_versions = ModelVersions(self._db, on_model_write=self.stamps.bump)

    @classmethod
    def for_settings(cls, settings: Settings, *, clock: Callable[[], dt.datetime] = utcnow) -> Store:
        """The installation's database. Retryable writes are off for the embedded
        SecantusDB: it keeps every retryable write's record and prunes them by a scan on
        each write, which cost a third of its CPU at 100 writes/s (py-spy, bench/nodes.py);
        a single local server has no failover for them to help with anyway."""
        return cls(uri=settings.database_uri, db_name=settings.database_name,
                   retry_writes=not settings.embedded_db, clock=clock)

    def documents(self, collection: str) -> Documents:
        if collection not in COLLECTIONS:
            raise KeyError(f"no collection module for {collection!r}")
        if collection not in self._docs:
            self._docs[collection] = Documents(
                self._db[collection], on_write=self.stamps.bump, clock=self._clock
            )
        return self._docs[collection]

    async def ensure_indexes(self) -> None:
        async with db_errors():
            for module in (*COLLECTIONS.values(), *RECORDS):
                await self._db[module.COLLECTION].create_indexes(module.INDEXES)

    async def ping(self, timeout: float = 1.0) -> None:
        """Raise :class:`~aiwm.errors.Unavailable` unless the database answers in time."""
        async with db_errors():
            with pymongo.timeout(timeout):
                await self._db.command("ping")

    async def close(self) -> None:
        await self._client.close()


__all__ = ["COLLECTIONS", "Documents", "Stamps", "Store", "db_errors", "utcnow"]

"""Collection ``node_metrics``: a bounded history of node metrics; a TTL index ages it out."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

from aiwm.store.documents import db_errors

COLLECTION = "node_metrics"
RETENTION_SECONDS = 7 * 86400
INDEXES = [
    IndexModel([("at", ASCENDING)], expireAfterSeconds=RETENTION_SECONDS, name="ttl_at"),
    IndexModel([("orgId", ASCENDING), ("nodeId", ASCENDING), ("at", DESCENDING)], name="org_node_at"),
]


class NodeMetrics:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._c = db[COLLECTION]

    async def add(self, *, org_id: str, node_id: str, at: dt.datetime, metrics: dict[str, Any]) -> None:
        async with db_errors():
            await self._c.insert_one({"orgId": org_id, "nodeId": node_id, "at": at, **metrics})

    async def recent(self, org_id: str, node_id: str, limit: int = 60) -> list[dict]:
        async with db_errors():
            cursor = self._c.find({"orgId": org_id, "nodeId": node_id}, {"_id": 0, "orgId": 0}) \
                .sort([("at", -1)]).limit(limit)
            return await cursor.to_list()

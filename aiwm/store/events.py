"""Collection ``events``: what happened (node.online, node.offline, ...); read newest first."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

from aiwm.store.documents import db_errors

COLLECTION = "events"
INDEXES = [
    IndexModel([("orgId", ASCENDING), ("at", DESCENDING)], name="org_at"),
    IndexModel([("orgId", ASCENDING), ("resource.type", ASCENDING), ("resource.id", ASCENDING),
                ("at", DESCENDING)], name="org_resource_at"),
]


class Events:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._c = db[COLLECTION]

    async def record(self, *, org_id: str, kind: str, resource: dict[str, str], at: dt.datetime,
                     data: dict[str, Any] | None = None) -> None:
        async with db_errors():
            await self._c.insert_one({"orgId": org_id, "type": kind, "resource": resource,
                                      "at": at, "data": data or {}})

    async def for_resource(self, org_id: str, kind: str, rid: str, limit: int = 50) -> list[dict]:
        async with db_errors():
            cursor = self._c.find({"orgId": org_id, "resource.type": kind, "resource.id": rid},
                                  {"_id": 0, "orgId": 0}).sort([("at", -1)]).limit(limit)
            return await cursor.to_list()

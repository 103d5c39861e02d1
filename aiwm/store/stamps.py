"""Collection ``stamps``: one counter per (org, collection), bumped by every write.

A reader that remembers the stamp it saw with a result can tell, with one small read,
whether that result is still current: the basis of the list cache in aiwm.catalog.
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from aiwm.store.documents import db_errors

COLLECTION = "stamps"
INDEXES: list[Any] = []  # keyed by _id


def key(org_id: str, collection: str) -> str:
    return f"{org_id}/{collection}"


class Stamps:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._c = db[COLLECTION]

    async def bump(self, org_id: str, collection: str) -> None:
        async with db_errors():
            await self._c.update_one({"_id": key(org_id, collection)}, {"$inc": {"n": 1}},
                                     upsert=True)

    async def read(self, org_id: str, collections: list[str]) -> tuple[int, ...]:
        """The current stamps of ``collections`` in ``org_id``, in the order given."""
        ids = [key(org_id, c) for c in collections]
        async with db_errors():
            found = {d["_id"]: d["n"] async for d in self._c.find({"_id": {"$in": ids}})}
        return tuple(int(found.get(i, 0)) for i in ids)

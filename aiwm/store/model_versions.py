"""Collection ``model_versions``: each upload or import of a model's files is a version.

A version is written only once all its files are in the object store, so a failed or
interrupted upload or import never leaves a half-made version visible. Version numbers
come from a counter on the model document; a failed attempt leaves a gap, never a reuse.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from aiwm.errors import NotFound
from aiwm.store.documents import db_errors

COLLECTION = "model_versions"
INDEXES = [
    IndexModel([("orgId", ASCENDING), ("modelId", ASCENDING), ("version", DESCENDING)],
               unique=True, name="org_model_version"),
]
_HIDDEN = {"_id": 0}


class ModelVersions:
    def __init__(self, db: AsyncDatabase[Any],
                 on_model_write: Callable[[str, str], Awaitable[None]] | None = None) -> None:
        self._c = db[COLLECTION]
        self._models = db["models"]
        self._on_model_write = on_model_write  # cached model lists must see latestVersion

    async def _model_written(self, org_id: str) -> None:
        if self._on_model_write is not None:
            await self._on_model_write(org_id, "models")

    async def allocate(self, org_id: str, model_id: str) -> int:
        """The next version number of a live model (NotFound if there is none)."""
        async with db_errors():
            doc = await self._models.find_one_and_update(
                {"orgId": org_id, "id": model_id, "deletedAt": None},
                {"$inc": {"versionCounter": 1}},
                projection={"versionCounter": 1}, return_document=ReturnDocument.AFTER)
        if doc is None:
            raise NotFound(f"model {model_id!r} not found")
        return int(doc["versionCounter"])

    async def add(self, *, org_id: str, model_id: str, version: int, by: str, source: str,
                  files: list[dict[str, Any]], at: dt.datetime,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record a complete version and make it the model's latest."""
        doc = {"orgId": org_id, "modelId": model_id, "version": version, "createdBy": by,
               "createdAt": at, "source": source, "files": files,
               "bytes": sum(int(f["size"]) for f in files), **(details or {})}
        async with db_errors():
            await self._c.insert_one(doc)
            try:
                await self._models.update_one(
                    {"orgId": org_id, "id": model_id, "latestVersion": {"$not": {"$gt": version}}},
                    {"$set": {"latestVersion": version, "status": "ready"}})
            except BaseException:
                # The caller drops the files when this fails: the version must go too.
                await self._c.delete_one({"orgId": org_id, "modelId": model_id,
                                          "version": version})
                raise
        await self._model_written(org_id)
        doc.pop("_id", None)
        return doc

    async def list(self, org_id: str, model_id: str) -> list[dict[str, Any]]:
        async with db_errors():
            return await self._c.find({"orgId": org_id, "modelId": model_id}, _HIDDEN) \
                .sort([("version", -1)]).to_list()

    async def get(self, org_id: str, model_id: str, version: int | None = None) -> dict[str, Any]:
        """One version; the latest when ``version`` is None."""
        query: dict[str, Any] = {"orgId": org_id, "modelId": model_id}
        if version is not None:
            query["version"] = version
        async with db_errors():
            doc = await self._c.find_one(query, _HIDDEN, sort=[("version", -1)])
        if doc is None:
            which = f"version {version}" if version is not None else "any version"
            raise NotFound(f"model {model_id!r} has no {which} yet; upload or import its files")
        return doc

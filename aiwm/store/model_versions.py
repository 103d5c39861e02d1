"""Collection ``model_versions``: each upload or import of a model's files is a version.

A version is written only once all its files are in the object store, so a failed or
interrupted upload or import never leaves a half-made version visible. Version numbers
come from a counter on the model document; a failed attempt leaves a gap, never a reuse.
A version being deleted is hidden first (``deletingAt``), then its files go, then the
record: a delete that stops half-way is finished by the next one.
"""

from __future__ import annotations

import builtins
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
_LIVE = {"deletingAt": None}  # also matches versions that never had the field


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
            return await self._c.find({"orgId": org_id, "modelId": model_id, **_LIVE}, _HIDDEN) \
                .sort([("version", -1)]).to_list()

    async def get(self, org_id: str, model_id: str, version: int | None = None) -> dict[str, Any]:
        """One version; the latest when ``version`` is None."""
        query: dict[str, Any] = {"orgId": org_id, "modelId": model_id, **_LIVE}
        if version is not None:
            query["version"] = version
        async with db_errors():
            doc = await self._c.find_one(query, _HIDDEN, sort=[("version", -1)])
        if doc is None:
            which = f"version {version}" if version is not None else "any version"
            raise NotFound(f"model {model_id!r} has no {which} yet; upload or import its files")
        return doc

    async def made_by(self, org_id: str, model_id: str, execution_id: str) -> dict[str, Any] | None:
        """The live version an execution's import already made, if any."""
        async with db_errors():
            return await self._c.find_one({"orgId": org_id, "modelId": model_id,
                                           "executionId": execution_id, **_LIVE}, _HIDDEN)

    async def hide(self, org_id: str, model_id: str, version: int,
                   at: dt.datetime) -> dict[str, Any]:
        """Start deleting a version: hide it from :meth:`list` and :meth:`get`, and make
        the highest version left the model's latest. NotFound if there is no such version;
        one already being deleted is returned again, so a retried delete can finish it."""
        which = {"orgId": org_id, "modelId": model_id, "version": version}
        async with db_errors():
            doc = await self._c.find_one_and_update(
                {**which, **_LIVE}, {"$set": {"deletingAt": at}},
                projection=_HIDDEN, return_document=ReturnDocument.AFTER)
            if doc is None:  # already being deleted, or none
                doc = await self._c.find_one(which, _HIDDEN)
        if doc is None:
            raise NotFound(f"model {model_id!r} has no version {version}")
        await self._set_latest(org_id, model_id, unless_above=None, was=version)
        return doc

    async def unhide(self, org_id: str, model_id: str, version: int) -> None:
        """Undo :meth:`hide` (the delete was refused): the version is back, and the
        model's latest again if it is the highest."""
        async with db_errors():
            await self._c.update_one({"orgId": org_id, "modelId": model_id, "version": version},
                                     {"$unset": {"deletingAt": ""}})
        await self._set_latest(org_id, model_id, unless_above=version, was=None)

    async def remove(self, org_id: str, model_id: str, version: int | None = None) -> None:
        """Drop the records of hidden versions whose files are gone: ``version``, or every
        hidden one of the model (a deleted model)."""
        query: dict[str, Any] = {"orgId": org_id, "modelId": model_id,
                                 "deletingAt": {"$ne": None}}
        if version is not None:
            query["version"] = version
        async with db_errors():
            await self._c.delete_many(query)

    async def _set_latest(self, org_id: str, model_id: str, *, unless_above: int | None,
                          was: int | None) -> None:
        """Point the model's ``latestVersion`` at its highest live version (its status
        back to "registered" when none is left). ``was``: only if the latest is still that
        version (a newer upload may have moved it on); ``unless_above``: only if the
        latest is not above that version already."""
        async with db_errors():
            top = await self._c.find_one({"orgId": org_id, "modelId": model_id, **_LIVE},
                                         {"_id": 0, "version": 1}, sort=[("version", -1)])
            latest = int(top["version"]) if top else None
            query: dict[str, Any] = {"orgId": org_id, "id": model_id}
            if was is not None:
                query["latestVersion"] = was
            if unless_above is not None:
                query["latestVersion"] = {"$not": {"$gt": unless_above}}
            result = await self._models.update_one(query, {"$set": {
                "latestVersion": latest, "status": "ready" if latest else "registered"}})
        if result.modified_count:
            await self._model_written(org_id)

    async def unfinished_deletes(self, before: dt.datetime,
                                 limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Versions (of any organisation) hidden for deleting before ``before`` and still
        here: a delete that stopped half-way (the object store was down, the replica
        died). ``[{orgId, modelId, version, deletingAt}]``, oldest first."""
        async with db_errors():
            cursor = self._c.find({"deletingAt": {"$ne": None, "$lt": before}},
                                  {"_id": 0, "orgId": 1, "modelId": 1, "version": 1,
                                   "deletingAt": 1}).sort([("deletingAt", 1)]).limit(limit)
            return await cursor.to_list()

    async def hide_all(self, org_id: str, model_id: str, at: dt.datetime) -> int:
        """Hide every version of a model whose files are about to go (a deleted model);
        how many there were, hidden before or now."""
        async with db_errors():
            await self._c.update_many({"orgId": org_id, "modelId": model_id, **_LIVE},
                                      {"$set": {"deletingAt": at}})
            return await self._c.count_documents({"orgId": org_id, "modelId": model_id})

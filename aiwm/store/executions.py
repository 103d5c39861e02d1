"""Collection ``executions``: durable workflows with their steps embedded.

The ExecutionOrchestrator is the only writer. Each state is written whole, conditioned on
the version it was computed from, so a second writer (e.g. an orchestrator that outlived
its replacement) gets :class:`VersionConflict` instead of overwriting newer state.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from aiwm.errors import AlreadyExists, NotFound, VersionConflict
from aiwm.store.documents import db_errors

COLLECTION = "executions"
UNFINISHED = ("pending", "running")
INDEXES = [
    IndexModel([("id", ASCENDING)], unique=True, name="execution_id"),
    IndexModel([("orgId", ASCENDING), ("createdAt", DESCENDING)], name="org_created"),
    IndexModel([("orgId", ASCENDING), ("status", ASCENDING)], name="org_status"),
    IndexModel([("status", ASCENDING)], name="status"),
    IndexModel([("orgId", ASCENDING), ("resource.type", ASCENDING), ("resource.id", ASCENDING)],
               name="org_resource"),
    IndexModel([("timeoutAt", ASCENDING)], name="timeout_at"),
]
_HIDDEN = {"_id": 0}


class Executions:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self._c = db[COLLECTION]

    async def insert(self, doc: dict[str, Any]) -> None:
        async with db_errors():
            try:
                await self._c.insert_one({**doc})
            except DuplicateKeyError:
                raise AlreadyExists(f"execution {doc['id']!r} already exists") from None

    async def save(self, doc: dict[str, Any]) -> None:
        """Write ``doc`` (whose ``version`` is already the new one) over version - 1."""
        async with db_errors():
            result = await self._c.replace_one({"id": doc["id"], "version": doc["version"] - 1},
                                               doc)
        if result.matched_count == 0:
            raise VersionConflict(f"execution {doc['id']!r} changed underneath (version "
                                  f"{doc['version'] - 1} is gone)")

    async def get(self, org_id: str | None, execution_id: str) -> dict[str, Any]:
        """One execution; ``org_id`` None only for the orchestrator's own reloads."""
        query: dict[str, Any] = {"id": execution_id}
        if org_id is not None:
            query["orgId"] = org_id
        async with db_errors():
            doc = await self._c.find_one(query, _HIDDEN)
        if doc is None:
            raise NotFound(f"execution {execution_id!r} not found")
        return doc

    async def page(self, query: dict[str, Any], *, skip: int, limit: int,
                   sort: Sequence[tuple[str, int]] = (("createdAt", -1),),
                   summary: bool = True) -> tuple[list[dict[str, Any]], int]:
        """A page and the total; ``summary`` leaves out each step's audit trail."""
        projection = {**_HIDDEN, "steps.messages": 0} if summary else _HIDDEN
        async with db_errors():
            docs = await self._c.find(query, projection).sort(list(sort)).skip(skip) \
                .limit(limit).to_list()
            total = await self._c.count_documents(query)
        return docs, total

    async def unfinished(self) -> list[dict[str, Any]]:
        async with db_errors():
            return await self._c.find({"status": {"$in": list(UNFINISHED)}}, _HIDDEN).to_list()

    async def downloading(self, org_id: str, model_id: str, version: int) -> str | None:
        """The id of an unfinished execution with a ``model.download`` step of this model
        version, if there is one (its node may still be fetching the files)."""
        async with db_errors():
            doc = await self._c.find_one(
                {"orgId": org_id, "status": {"$in": list(UNFINISHED)},
                 "steps": {"$elemMatch": {"command": "model.download",
                                          "data.modelId": model_id, "data.version": version}}},
                {"_id": 0, "id": 1})
        return None if doc is None else str(doc["id"])

    async def fetching_on(self, org_id: str, node_id: str, model_id: str | None = None, *,
                          also: Sequence[str] = ()) -> dict[str, set[int]]:
        """Model id -> the versions unfinished executions (and those of ids ``also``, in
        any status) have a ``model.download`` step of on that node (of that model only, if
        given): deploys under way, whose version no deployment records yet, and failed
        ones a retry would start from their downloaded files."""
        match: dict[str, Any] = {"command": "model.download", "nodeId": node_id}
        if model_id is not None:
            match["data.modelId"] = model_id
        which: dict[str, Any] = {"status": {"$in": list(UNFINISHED)}}
        if also:
            which = {"$or": [which, {"id": {"$in": list(also)}}]}
        async with db_errors():
            docs = await self._c.find(
                {"orgId": org_id, **which, "steps": {"$elemMatch": match}},
                {"_id": 0, "steps": 1}).to_list()
        found: dict[str, set[int]] = {}
        for d in docs:
            for s in d.get("steps", []):
                data = s.get("data") or {}
                model, version = data.get("modelId"), data.get("version")
                if s.get("command") == "model.download" and s.get("nodeId") == node_id \
                        and isinstance(model, str) and (model_id is None or model == model_id) \
                        and isinstance(version, int) and not isinstance(version, bool):
                    found.setdefault(model, set()).add(version)
        return found

    async def overdue(self, now: dt.datetime, limit: int = 500) -> list[str]:
        """Ids of unfinished executions whose deadline has passed."""
        async with db_errors():
            docs = await self._c.find({"status": {"$in": list(UNFINISHED)}, "timeoutAt": {"$lte": now}},
                                      {"_id": 0, "id": 1}).limit(limit).to_list()
        return [d["id"] for d in docs]

"""Versioned, org-scoped, soft-deletable documents in one MongoDB collection.

Every document has ``id``, ``orgId``, ``createdBy``, ``createdAt``, ``updatedAt``,
``deletedAt`` and ``version``. Every read and write is scoped to one org; updates can be
conditioned on the caller's version, so a stale write is refused, never lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WTimeoutError,
)

from aiwm.errors import AlreadyExists, NotFound, Unavailable, ValidationFailed, VersionConflict

_HIDDEN = {"_id": 0}
UNREACHABLE = (
    AutoReconnect,
    ConnectionFailure,
    ServerSelectionTimeoutError,
    NetworkTimeout,
    ExecutionTimeout,
    WTimeoutError,
)


@contextlib.asynccontextmanager
async def db_errors() -> AsyncIterator[None]:
    """Turn "the database is unreachable" into :class:`Unavailable` (HTTP 503), and an
    integer the database cannot hold (BSON keeps -2^63 to 2^63-1; JSON and Python have no
    bound) into :class:`ValidationFailed` (422), before anything is written."""
    try:
        yield
    except UNREACHABLE as e:
        raise Unavailable(f"database unreachable: {type(e).__name__}") from None
    except OverflowError:
        raise ValidationFailed(INT_RANGE, extra={"errors": [
            {"field": "body", "message": INT_RANGE, "type": "int_range"}]}) from None


INT_RANGE = "a number is too large: integers must lie between -2^63 and 2^63-1"


def utcnow() -> dt.datetime:
    # MongoDB keeps milliseconds; truncate so what we return equals what we read back.
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Documents:
    """One collection of catalog documents. ``clock`` is a parameter so tests need no sleep."""

    def __init__(
        self,
        collection: AsyncCollection[Any],
        *,
        on_write: Callable[[str, str], Awaitable[None]] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._c = collection
        self._on_write = on_write
        self._clock = clock

    async def _written(self, org_id: str) -> None:
        if self._on_write is not None:
            await self._on_write(org_id, self._c.name)

    @property
    def name(self) -> str:
        return self._c.name

    @staticmethod
    def live(org_id: str, **match: Any) -> dict[str, Any]:
        """The filter for documents of ``org_id`` that are not deleted."""
        return {"orgId": org_id, "deletedAt": None, **match}

    async def insert(self, *, org_id: str, doc_id: str, by: str, fields: dict[str, Any]) -> dict:
        now = self._clock()
        doc = {
            "id": doc_id,
            "orgId": org_id,
            "createdBy": by,
            "createdAt": now,
            "updatedAt": now,
            "deletedAt": None,
            "version": 1,
            **fields,
        }
        async with db_errors():
            try:
                await self._c.insert_one(doc)
            except DuplicateKeyError:
                raise AlreadyExists(f"{self.name} {doc_id!r} already exists") from None
        await self._written(org_id)
        doc.pop("_id", None)
        return doc

    async def get(self, org_id: str, doc_id: str) -> dict:
        async with db_errors():
            doc = await self._c.find_one(self.live(org_id, id=doc_id), _HIDDEN)
        if doc is None:
            raise NotFound(f"{self.name} {doc_id!r} not found")
        return doc

    async def find(
        self,
        query: dict[str, Any],
        *,
        sort: Sequence[tuple[str, int]] = (("createdAt", -1),),
        skip: int = 0,
        limit: int = 0,
    ) -> list[dict]:
        """Documents matching ``query`` (the caller scopes it with :meth:`live`)."""
        async with db_errors():
            cursor = self._c.find(query, _HIDDEN).sort(list(sort)).skip(skip).limit(limit)
            return await cursor.to_list()

    async def count(self, query: dict[str, Any]) -> int:
        async with db_errors():
            return await self._c.count_documents(query)

    async def find_page(
        self, query: dict[str, Any], *, sort: Sequence[tuple[str, int]], skip: int, limit: int
    ) -> tuple[list[dict], int]:
        docs = await self.find(query, sort=sort, skip=skip, limit=limit + 1)
        if 0 < len(docs) <= limit or (skip == 0 and not docs):
            return docs, skip + len(docs)  # the last page: the total needs no count
        return docs[:limit], await self.count(query)

    async def update(
        self,
        org_id: str,
        doc_id: str,
        *,
        set_fields: dict[str, Any],
        expected_version: int | None = None,
        unset_fields: Sequence[str] = (),
    ) -> dict:
        """Apply ``set_fields``; with ``expected_version``, only to that version."""
        match = self.live(org_id, id=doc_id)
        if expected_version is not None:
            match["version"] = expected_version
        change: dict[str, Any] = {
            "$set": {**set_fields, "updatedAt": self._clock()},
            "$inc": {"version": 1},
        }
        if unset_fields:
            change["$unset"] = {f: "" for f in unset_fields}
        async with db_errors():
            doc = await self._c.find_one_and_update(
                match, change, projection=_HIDDEN, return_document=ReturnDocument.AFTER
            )
        if doc is not None:
            await self._written(org_id)
        else:
            current = await self.get(org_id, doc_id)  # raises NotFound
            raise VersionConflict(
                f"{self.name} {doc_id!r} is at version {current['version']}, "
                f"not {expected_version}; re-read it and try again",
                extra={"currentVersion": current["version"]},
            )
        return doc

    async def set_state(self, org_id: str, doc_id: str, fields: dict[str, Any]) -> dict:
        """Update server-managed fields (status, telemetry). The version is not bumped:
        it guards what clients write, and a heartbeat must not make their If-Match stale."""
        async with db_errors():
            doc = await self._c.find_one_and_update(
                self.live(org_id, id=doc_id), {"$set": fields},
                projection=_HIDDEN, return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            raise NotFound(f"{self.name} {doc_id!r} not found")
        await self._written(org_id)
        return doc

    async def set_state_if(self, org_id: str, doc_id: str, match: dict[str, Any],
                           fields: dict[str, Any]) -> bool:
        """:meth:`set_state`, only while the document also matches ``match`` (e.g. is still
        in the status the change assumes). Returns whether it changed."""
        async with db_errors():
            result = await self._c.update_one({**self.live(org_id, id=doc_id), **match},
                                              {"$set": fields})
        if result.modified_count:
            await self._written(org_id)
        return bool(result.modified_count)

    async def touch(self, org_id: str, doc_id: str, fields: dict[str, Any]) -> None:
        """A frequent, small state write (a heartbeat's timestamp): one update, no read
        back, no version and no stamp bump. Cached list pages may show the previous value
        for up to their max age (30 s); a GET of the document is always current."""
        async with db_errors():
            result = await self._c.update_one({"orgId": org_id, "id": doc_id}, {"$set": fields})
        if result.matched_count == 0:
            raise NotFound(f"{self.name} {doc_id!r} not found")

    async def soft_delete(self, org_id: str, doc_id: str, expected_version: int | None) -> dict:
        now = self._clock()
        return await self.update(
            org_id, doc_id, set_fields={"deletedAt": now}, expected_version=expected_version
        )

    async def soft_delete_many(self, query: dict[str, Any]) -> int:
        now = self._clock()
        async with db_errors():
            result = await self._c.update_many(
                query, {"$set": {"deletedAt": now, "updatedAt": now}, "$inc": {"version": 1}}
            )
        if result.modified_count:
            await self._written(query["orgId"])
        return result.modified_count

"""Reading the catalog: get, list and populate, always inside the caller's org.

Reads go straight to the store from wherever they are served; writes go through the
Registry actor, the single writer.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from aiwm.coalesce import Coalescer
from aiwm.errors import ValidationFailed
from aiwm.models import EntitySpec, Reference, entity
from aiwm.query import ListQuery, mongo_filter
from aiwm.store import Documents, Store


def populate_refs(spec: EntitySpec, raw: str | None) -> list[Reference]:
    """Parse ``?populate=a,b`` against the references ``spec`` can embed."""
    if not raw:
        return []
    by_name = {r.populate: r for r in spec.references}
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        allowed = ", ".join(by_name) or "nothing"
        raise ValidationFailed(
            f"{spec.singular} cannot populate {', '.join(unknown)}; it can populate {allowed}",
            extra={"errors": [{"field": "query.populate",
                               "message": f"unknown: {', '.join(unknown)}; allowed: {allowed}",
                               "type": "invalid_populate"}]},
        )
    return [by_name[n] for n in names]


async def populate(
    store: Store, org_id: str, docs: list[dict[str, Any]], refs: Iterable[Reference]
) -> None:
    """Embed referenced documents in place: one query per reference, whatever the page size."""
    for ref in refs:
        ids: set[str] = set()
        for d in docs:
            value: Any = d.get(ref.field)
            ids.update(value if ref.many else [value] if value else [])
        found = {}
        if ids:
            targets = await store.documents(entity(ref.target).name).find(
                Documents.live(org_id, id={"$in": sorted(ids)})
            )
            found = {t["id"]: t for t in targets}
        for d in docs:
            value = d.get(ref.field)
            if ref.many:
                d[ref.populate] = [found[i] for i in value or [] if i in found]
            else:
                d[ref.populate] = found.get(value) if value else None


async def get_one(
    store: Store, org_id: str, spec: EntitySpec, doc_id: str, refs: list[Reference]
) -> dict[str, Any]:
    doc = await store.documents(spec.name).get(org_id, doc_id)
    await populate(store, org_id, [doc], refs)
    return doc


async def list_page(
    store: Store,
    org_id: str,
    spec: EntitySpec,
    query: ListQuery,
    refs: list[Reference],
    scope: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One page: ``{data, total, page, limit}``. ``scope`` narrows it (e.g. one conversation)."""
    base = Documents.live(org_id, **(scope or {}))
    docs, total = await store.documents(spec.name).find_page(
        mongo_filter(query, spec, base), sort=query.sort, skip=query.skip, limit=query.limit
    )
    await populate(store, org_id, docs, refs)
    return {"data": docs, "total": total, "page": query.page, "limit": query.limit}


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")  # as pydantic writes UTC
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def to_json(obj: Any) -> bytes:
    """Stored documents as JSON, with values written as the response models write them
    (UTC times end in ``Z``); keys keep their stored order."""
    return json.dumps(obj, default=_json_default, separators=(",", ":"),
                      ensure_ascii=False).encode()


class PageCache:
    """Recent list pages as JSON, each kept with the stamps of the collections it read.

    A page is served again only while every stamp is unchanged, so a write (which bumps
    its collection's stamp before it is acknowledged) is seen by the next read. Pages
    also expire after ``max_age`` seconds: should a bump ever fail after its write (the
    database going away between the two), a stale page lives no longer than that.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 32 * 1024 * 1024,
        max_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pages: OrderedDict[str, tuple[tuple[int, ...], bytes, float]] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._max_age = max_age
        self._clock = clock

    def get(self, key: str, stamps: tuple[int, ...]) -> bytes | None:
        hit = self._pages.get(key)
        if hit is None or hit[0] != stamps or self._clock() - hit[2] > self._max_age:
            return None
        self._pages.move_to_end(key)
        return hit[1]

    def put(self, key: str, stamps: tuple[int, ...], payload: bytes) -> None:
        if len(payload) > self._max // 4:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
        self._pages[key] = (stamps, payload, self._clock())
        self._bytes += len(payload)
        while self._bytes > self._max:
            _, (_, evicted, _) = self._pages.popitem(last=False)
            self._bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._pages)


async def list_json(
    store: Store,
    cache: PageCache,
    reads: Coalescer[tuple[int, ...]],
    org_id: str,
    spec: EntitySpec,
    query: ListQuery,
    refs: list[Reference],
    scope: dict[str, Any] | None = None,
) -> bytes:
    """:func:`list_page` as JSON, from ``cache`` while nothing it read has changed."""
    collections = [spec.name, *(ref.target for ref in refs)]
    stamps = await reads.run(
        (org_id, *collections), lambda: store.stamps.read(org_id, collections)
    )
    key = repr((org_id, spec.name, query, [r.populate for r in refs], scope))
    payload = cache.get(key, stamps)
    if payload is None:
        payload = to_json(await list_page(store, org_id, spec, query, refs, scope))
        cache.put(key, stamps, payload)
    return payload

"""Reading the catalog: get, list and populate, always inside the caller's org.

Reads go straight to the store from wherever they are served; writes go through the
Registry actor, the single writer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
            value = d.get(ref.field)
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

"""One generic CRUD router for every plain catalog entity.

Routes (for ``spec.name == "instructions"``): ``POST /instructions``, ``GET
/instructions``, ``GET|PUT|PATCH|DELETE /instructions/{id}``. Reads hit the store;
writes go to the Registry actor.
"""

# No `from __future__ import annotations` here: FastAPI must see the real body classes,
# which are local variables of crud_router().

import inspect
import re
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, create_model

from aiwm.auth import Principal
from aiwm.catalog import get_one, list_json, populate_refs, to_json
from aiwm.errors import ValidationFailed
from aiwm.models import EntitySpec
from aiwm.query import MAX_LIMIT, parse_list_query
from serve.deps import operator, state, viewer
from serve.problems import AUTHENTICATED, responses

IF_MATCH = "Expected current version; a stale one is refused with 409 version_conflict"
# Typed `str`, not `str | None`, so that the schema offers no null (there are no null
# headers); it is None when absent. The pattern documents what if_match() accepts.
IfMatch = Header(None, alias="If-Match", description=IF_MATCH,
                 json_schema_extra={"pattern": r'^(W/)?"?[0-9]{1,18}"?$'})


def page_model(spec: EntitySpec) -> type[BaseModel]:
    return create_model(  # type: ignore[call-overload, no-any-return]
        f"{spec.read.__name__}Page",
        data=(list[spec.read], ...),  # type: ignore[name-defined]
        total=(int, ...),
        page=(int, ...),
        limit=(int, ...),
    )


def if_match(value: str | None) -> int | None:
    """Parse an ``If-Match`` header: a version number, optionally quoted as an ETag."""
    if value is None:
        return None
    raw = value.strip().removeprefix("W/").strip('"')
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise ValidationFailed(
            "If-Match must be the document's version number",
            extra={"errors": [{"field": "header.if-match", "message": "must be an integer",
                               "type": "int_parsing"}]},
        )
    return int(raw)


def comma_list(words: Iterable[str], prefix: str = "") -> str:
    """The pattern of a comma list of ``words`` as the server parses it: blanks around
    and between items are ignored; ``prefix`` is a regex allowed before each word."""
    alternatives = "|".join(map(re.escape, words))
    if not alternatives:
        return r"^[\s,]*$"
    item = rf"\s*({prefix}({alternatives}))?\s*"
    return f"^{item}(,{item})*$"


def _filter_params(spec: EntitySpec) -> Any:
    """A no-op dependency whose signature documents the entity's filters in OpenAPI."""

    async def filters(**_: Any) -> None:  # async: a sync dependency costs a thread hop
        return None

    kinds = {"str": str, "bool": bool, "int": int}
    filters.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY,
            default=Query(None, description="exact match; a,b matches either"),
            annotation=kinds[f.kind] | None,
        )
        for f in spec.filters
    ])
    return filters


def crud_router(spec: EntitySpec, *, skip: frozenset[str] = frozenset()) -> APIRouter:
    """The CRUD routes of ``spec``; ``skip`` names operations (create, delete) that an
    entity's own router serves instead, because for it they are actions."""
    router = APIRouter(prefix=f"/{spec.name}", tags=[spec.name],
                       responses=responses(*AUTHENTICATED))
    Create: Any = spec.create
    Patch: Any = spec.update
    Out, Page = spec.read, page_model(spec)
    IdPath = Path(description=f"The {spec.singular}'s id", max_length=100)
    populate_doc = (
        "Embed referenced documents: " + ", ".join(r.populate for r in spec.references)
        if spec.references else "This entity references nothing"
    )
    # The patterns document what parse_list_query() and populate_refs() accept; those,
    # not FastAPI, check them, so that every bad parameter is reported at once. (Typed
    # `str` with a None default, like IfMatch, so that the schema offers no null.)
    Populate = Query(None, description=populate_doc, json_schema_extra={
        "pattern": comma_list(r.populate for r in spec.references)})

    @_unless("create" in skip, router.post("", status_code=201, response_model=Out,
                                           responses=responses(409, 413),
                                           summary=f"Create a {spec.singular}"))
    async def create(body: Create, request: Request, p: Principal = Depends(operator)) -> Any:  # type: ignore[valid-type]
        return await state(request).writer.call("create", p, spec.name, body.model_dump(mode="json"))

    @router.get("", response_model=Page, summary=f"List {spec.name}",
                dependencies=[Depends(_filter_params(spec))])
    async def list_(
        request: Request,
        page: int = Query(1, ge=1, le=1_000_000),
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        sort: str = Query(None, description=f"comma list of {', '.join(spec.sortable)}; "
                          "prefix - for descending",
                          json_schema_extra={"pattern": comma_list(spec.sortable, "[+-]*")}),
        q: str | None = Query(None, max_length=200,
                              description=f"case-insensitive search in {', '.join(spec.search)}"),
        populate: str = Populate,
        p: Principal = Depends(viewer),
    ) -> Any:
        query = parse_list_query(request.query_params.multi_items(), spec)
        refs = populate_refs(spec, populate)
        s = state(request)
        payload = await list_json(s.store, s.pages, s.stamp_reads, p.org_id, spec, query, refs)
        return Response(payload, media_type="application/json")

    @router.get("/{doc_id}", response_model=Out, responses=responses(404),
                summary=f"Get a {spec.singular}")
    async def get(
        request: Request,
        doc_id: str = IdPath,
        populate: str = Populate,
        p: Principal = Depends(viewer),
    ) -> Any:
        refs = populate_refs(spec, populate)
        doc = await get_one(state(request).store, p.org_id, spec, doc_id, refs)
        return Response(to_json(doc), media_type="application/json")

    @router.put("/{doc_id}", response_model=Out, responses=responses(404, 409, 413),
                summary=f"Replace a {spec.singular}")
    async def replace(
        body: Create,  # type: ignore[valid-type]
        request: Request,
        doc_id: str = IdPath,
        if_match_header: str = IfMatch,
        p: Principal = Depends(operator),
    ) -> Any:
        return await state(request).writer.call(
            "replace", p, spec.name, doc_id, body.model_dump(mode="json"), if_match(if_match_header)
        )

    @router.patch("/{doc_id}", response_model=Out, responses=responses(404, 409, 413),
                  summary=f"Update some fields of a {spec.singular}")
    async def update(
        body: Patch,  # type: ignore[valid-type]
        request: Request,
        doc_id: str = IdPath,
        if_match_header: str = IfMatch,
        p: Principal = Depends(operator),
    ) -> Any:
        changes = body.model_dump(mode="json", exclude_unset=True)
        version = changes.pop("version", None)
        header_version = if_match(if_match_header)
        if header_version is not None:
            version = header_version
        return await state(request).writer.call("update", p, spec.name, doc_id, changes, version)

    @_unless("delete" in skip, router.delete("/{doc_id}", response_model=Out,
                                             responses=responses(404, 409),
                                             summary=f"Delete a {spec.singular} (soft)"))
    async def delete(
        request: Request,
        doc_id: str = IdPath,
        if_match_header: str = IfMatch,
        p: Principal = Depends(operator),
    ) -> Any:
        return await state(request).writer.call(
            "delete", p, spec.name, doc_id, if_match(if_match_header)
        )

    return router


def _unless(skipped: bool, decorator: Any) -> Any:
    """``decorator``, or nothing when the operation is skipped."""
    return (lambda f: f) if skipped else decorator

"""Registry: the single writer of catalog entities.

A plain class; ``actors/__init__.py`` makes it an actor. Every write validates the body,
checks references within the caller's org, and is serialised by one lock, so a
reference check and the write it guards cannot interleave with a conflicting write.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError

from aiwm.auth import Principal, Role, issue_node_token
from aiwm.errors import (
    AlreadyExists,
    InUse,
    InvalidReference,
    NotFound,
    ValidationFailed,
    field_errors,
)
from aiwm.models import EntitySpec, entity, merge_patch, referrers
from aiwm.settings import Settings
from aiwm.store import Documents, Store, utcnow

log = logging.getLogger("aiwm.registry")
SYSTEM_FIELDS = ("id", "orgId", "createdBy", "createdAt", "updatedAt", "deletedAt", "version")
IN_USE_SAMPLE = 5


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class Sessions(Protocol):
    """Live node sessions, so that revoking a token or deleting a node ends its session."""

    async def close(self, node_id: str, org_id: str, deleted: bool = False) -> None: ...


class Registry:
    """Creates, updates and deletes catalog documents on behalf of a principal."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: Sessions | None = None,
        id_factory: Callable[[str], str] = new_id,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._new_id = id_factory
        self._clock = clock
        self._store: Store | None = None
        self._indexed = False
        self._lock = asyncio.Lock()

    async def _db(self) -> Store:
        if self._store is None:
            self._store = Store.for_settings(self._settings, clock=self._clock)
        if not self._indexed:
            await self._store.ensure_indexes()
            self._indexed = True
        return self._store

    async def ping(self) -> str:
        return "ok"

    async def start(self) -> None:
        """Connect and create the indexes; `deploy` calls it so they exist at start."""
        await self._db()

    # --- writes -----------------------------------------------------------------------

    async def create(self, principal: Principal, name: str, body: dict[str, Any]) -> dict:
        principal.require(Role.operator)
        spec = entity(name)
        fields = _validate(spec, body)
        async with self._lock:
            store = await self._db()
            await self._check_references(store, principal.org_id, spec, fields)
            await self._check_unique(store, principal.org_id, spec, fields, doc_id=None)
            return _logged("created", spec, principal, await store.documents(spec.name).insert(
                org_id=principal.org_id,
                doc_id=self._new_id(spec.id_prefix),
                by=principal.sub,
                fields={**fields, **spec.state_defaults()},  # the response models' order
            ))

    async def replace(
        self,
        principal: Principal,
        name: str,
        doc_id: str,
        body: dict[str, Any],
        expected_version: int | None = None,
    ) -> dict:
        """PUT: every writable field takes the body's value or its default."""
        principal.require(Role.operator)
        spec = entity(name)
        fields = _validate(spec, body)
        async with self._lock:
            return _logged("replaced", spec, principal, await self._write(
                await self._db(), principal, spec, doc_id, fields, expected_version))

    async def update(
        self,
        principal: Principal,
        name: str,
        doc_id: str,
        changes: dict[str, Any],
        expected_version: int | None = None,
    ) -> dict:
        """PATCH as a JSON merge patch (RFC 7396): nested objects merge, ``null`` clears;
        the merged document must still be valid."""
        principal.require(Role.operator)
        spec = entity(name)
        unknown = sorted(set(changes) - spec.writable)
        if unknown:
            raise ValidationFailed(
                f"{spec.singular} has no writable field(s) {', '.join(unknown)}",
                extra={"errors": [{"field": f"body.{f}", "message": "not a writable field",
                                   "type": "extra_forbidden"} for f in unknown]},
            )
        async with self._lock:
            store = await self._db()
            current = await store.documents(spec.name).get(principal.org_id, doc_id)
            merged = merge_patch({k: current[k] for k in spec.writable if k in current}, changes)
            fields = _validate(spec, merged)
            version = current["version"] if expected_version is None else expected_version
            return _logged("updated", spec, principal,
                           await self._write(store, principal, spec, doc_id, fields, version))

    async def delete(
        self, principal: Principal, name: str, doc_id: str, expected_version: int | None = None
    ) -> dict:
        principal.require(Role.operator)
        spec = entity(name)
        async with self._lock:
            store = await self._db()
            docs = store.documents(spec.name)
            current = await docs.get(principal.org_id, doc_id)  # 404 before "in use"
            expected = current["version"] if expected_version is None else expected_version
            await self._refuse_if_used(store, principal.org_id, spec, doc_id)
            if expected == current["version"]:  # a stale version cascades nothing
                # Dependents first: if this stops half-way, a retried delete finishes the
                # job, and no orphan is ever visible under a deleted parent.
                for src, ref in referrers(spec.name):
                    if ref.on_delete == "cascade":
                        await store.documents(src.name).soft_delete_many(
                            Documents.live(principal.org_id, **{ref.field: doc_id})
                        )
            deleted = await docs.soft_delete(principal.org_id, doc_id, expected)  # 409 if stale
        if spec.name == "nodes" and self._sessions is not None:
            # A deleted node keeps no session: its agent is told to go, and commands to
            # it are refused as for any unknown node.
            await self._sessions.close(doc_id, principal.org_id, deleted=True)
        return _logged("deleted", spec, principal, deleted)

    # --- node tokens ------------------------------------------------------------------

    async def issue_node_token(
        self, principal: Principal, node_id: str, expires_in: int | None, description: str | None
    ) -> dict[str, Any]:
        """A new token for ``node_id``; it supersedes the node's previous token."""
        principal.require(Role.admin)
        lifetime = expires_in or self._settings.node_token_expires_in
        token_id = uuid.uuid4().hex
        async with self._lock:
            store = await self._db()
            await store.documents("nodes").get(principal.org_id, node_id)
            token, expires = issue_node_token(
                secret=self._settings.secret(), node_id=node_id, org_id=principal.org_id,
                token_id=token_id, expires_in=lifetime, now=self._clock)
            meta = {"tokenId": token_id, "lastGenerated": self._clock(), "expiresAt": expires,
                    "description": description, "revokedAt": None}
            await store.documents("nodes").set_state(principal.org_id, node_id,
                                                     {"tokenMetadata": meta})
        return {"nodeId": node_id, "token": token, "expiresAt": expires.isoformat(),
                "expiresIn": lifetime, "tokenId": token_id}

    async def revoke_node_token(self, principal: Principal, node_id: str) -> dict[str, Any]:
        """Revoke the node's token and end any session open with it."""
        principal.require(Role.admin)
        async with self._lock:
            store = await self._db()
            node = await store.documents("nodes").get(principal.org_id, node_id)
            meta = dict(node.get("tokenMetadata") or {})
            if not meta.get("tokenId"):
                raise NotFound(f"node {node_id!r} has no token to revoke")
            meta["revokedAt"] = meta.get("revokedAt") or self._clock()
            node = await store.documents("nodes").set_state(principal.org_id, node_id,
                                                            {"tokenMetadata": meta})
        if self._sessions is not None:
            await self._sessions.close(node_id, principal.org_id)
        return node

    # --- helpers ----------------------------------------------------------------------

    async def _write(
        self,
        store: Store,
        principal: Principal,
        spec: EntitySpec,
        doc_id: str,
        fields: dict[str, Any],
        expected_version: int | None,
    ) -> dict:
        """Check and apply a full set of writable fields; the caller holds the lock."""
        await self._check_references(store, principal.org_id, spec, fields)
        await self._check_unique(store, principal.org_id, spec, fields, doc_id=doc_id)
        return await store.documents(spec.name).update(
            principal.org_id, doc_id, set_fields=fields, expected_version=expected_version
        )

    async def _check_references(
        self, store: Store, org_id: str, spec: EntitySpec, fields: dict[str, Any]
    ) -> None:
        errors = []
        for ref in spec.references:
            value: Any = fields.get(ref.field)
            wanted = set(value if ref.many else [value]) - {None, ""}
            if not wanted:
                continue
            found = await store.documents(ref.target).find(
                Documents.live(org_id, id={"$in": sorted(wanted)})
            )
            missing = sorted(wanted - {d["id"] for d in found})
            if missing:
                target = entity(ref.target).singular
                errors.append({
                    "field": f"body.{ref.field}",
                    "message": f"no {target} with id {', '.join(map(repr, missing))}",
                    "type": "invalid_reference",
                })
        if errors:
            raise InvalidReference(
                "; ".join(e["message"] for e in errors), extra={"errors": errors}
            )

    async def _check_unique(
        self,
        store: Store,
        org_id: str,
        spec: EntitySpec,
        fields: dict[str, Any],
        *,
        doc_id: str | None,
    ) -> None:
        for field in spec.unique:
            query = Documents.live(org_id, **{field: fields[field]})
            if doc_id is not None:
                query["id"] = {"$ne": doc_id}
            clash = await store.documents(spec.name).find(query, limit=1)
            if clash:
                raise AlreadyExists(
                    f"a {spec.singular} with {field} {fields[field]!r} already exists "
                    f"({clash[0]['id']})",
                    extra={"field": field, "existingId": clash[0]["id"]},
                )

    async def _refuse_if_used(
        self, store: Store, org_id: str, spec: EntitySpec, doc_id: str
    ) -> None:
        used_by: list[dict[str, Any]] = []
        for src, ref in referrers(spec.name):
            if ref.on_delete != "refuse":
                continue
            query = Documents.live(org_id, **{ref.field: doc_id})
            users = await store.documents(src.name).find(query, limit=IN_USE_SAMPLE)
            if users:
                total = await store.documents(src.name).count(query)
                used_by.append({
                    "entity": src.name,
                    "count": total,
                    "ids": [u["id"] for u in users],
                    "names": [u.get("name") or u.get("title") or u["id"] for u in users],
                })
        if used_by:
            parts = [
                f"{u['count']} {u['entity']} ({', '.join(u['ids'])}"
                + (", ..." if u["count"] > len(u["ids"]) else "") + ")"
                for u in used_by
            ]
            raise InUse(
                f"{spec.singular} {doc_id!r} is still used by {'; '.join(parts)}; "
                "delete or change those first",
                extra={"usedBy": used_by},
            )


def _validate(spec: EntitySpec, body: dict[str, Any]) -> dict[str, Any]:
    try:
        model = spec.create.model_validate(body)
    except ValidationError as e:
        raise ValidationFailed(
            f"invalid {spec.singular}", extra={"errors": field_errors(e.errors())}
        ) from None
    return model.model_dump(mode="json")


def _logged(action: str, spec: EntitySpec, principal: Principal, doc: dict) -> dict:
    log.info("%s %s %s", spec.singular, doc.get("id"), action, extra={
        "entity": spec.name, "id": doc.get("id"), "orgId": principal.org_id,
        "by": principal.sub, "version": doc.get("version")})
    return doc

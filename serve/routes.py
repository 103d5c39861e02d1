"""Routes that are real actions rather than plain CRUD."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aiwm.auth import Principal, Role, issue_token
from aiwm.catalog import list_json, populate_refs
from aiwm.errors import AiwmError, Forbidden
from aiwm.models import entity
from aiwm.query import MAX_LIMIT, parse_list_query
from serve.deps import admin, state, viewer
from serve.problems import AUTHENTICATED, responses

router = APIRouter()
HEALTH_TIMEOUT = 1.0


async def _check(name: str, probe: Any) -> tuple[str, dict[str, Any]]:
    """Await ``probe``; a dict it returns adds facts to the check's entry."""
    started = time.perf_counter()
    try:
        found = await asyncio.wait_for(probe, HEALTH_TIMEOUT + 0.5)
    except AiwmError as e:
        return name, {"status": "down", "error": e.detail}
    except TimeoutError:
        return name, {"status": "down", "error": f"no answer within {HEALTH_TIMEOUT + 0.5:g} s"}
    except Exception as e:  # a health check reports, it never raises
        return name, {"status": "down", "error": f"{type(e).__name__}: {e}"}
    facts = found if isinstance(found, dict) else {}
    return name, {"status": "up", "latencyMs": round((time.perf_counter() - started) * 1000, 1),
                  **facts}


@router.get("/health", tags=["health"], summary="Health of the API and each dependency",
            responses={503: {"description": "A dependency is down (status degraded); the body "
                                            "says which, as for 200"}})
async def health(request: Request) -> JSONResponse:
    s = state(request)
    objects = getattr(request.app.state, "object_store", None)
    results = dict(await asyncio.gather(
        _check("database", s.store.ping(HEALTH_TIMEOUT)),
        _check("registry", s.writer.ping(HEALTH_TIMEOUT)),
        _check("nodeHosts", s.node_hosts(HEALTH_TIMEOUT)),
        *([_check("orchestrator", s.orchestrator.ping(HEALTH_TIMEOUT))] if s.orchestrator else []),
        *([_check("objectStore", objects.ping())] if objects is not None else []),
    ))
    ok = all(r["status"] == "up" for r in results.values())
    body = {
        "status": "ok" if ok else "degraded",
        "version": request.app.version,
        "checks": results,
    }
    return JSONResponse(body, status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": "5"})


class TokenRequest(BaseModel):
    model_config = {"extra": "forbid"}

    sub: str = Field(min_length=1, max_length=200, description="Who the token is for")
    roles: list[Role] = Field(min_length=1)
    orgId: str | None = Field(None, description="Defaults to, and must equal, the caller's org")
    expiresIn: int | None = Field(None, gt=0, le=10 * 365 * 86400, description="seconds")


class TokenResponse(BaseModel):
    token: str
    sub: str
    orgId: str
    roles: list[Role]
    expiresAt: str
    expiresIn: int


@router.post("/tokens", tags=["auth"], status_code=201, response_model=TokenResponse,
             responses=responses(*AUTHENTICATED, 413),
             summary="Issue a user token in the caller's org (admin)")
async def create_token(
    body: TokenRequest, request: Request, p: Principal = Depends(admin)
) -> TokenResponse:
    org = body.orgId or p.org_id
    if org != p.org_id:
        raise Forbidden("an admin can issue tokens only for their own org")
    settings = state(request).settings
    expires_in = body.expiresIn or settings.jwt_expires_in
    token, expires = issue_token(
        secret=settings.secret(), sub=body.sub, org_id=org, roles=body.roles,
        expires_in=expires_in,
    )
    return TokenResponse(token=token, sub=body.sub, orgId=org, roles=body.roles,
                         expiresAt=expires.isoformat(), expiresIn=expires_in)


_MESSAGES = entity("messages")
_CONVERSATIONS = entity("conversations")


@router.get("/conversations/{doc_id}/messages", tags=["conversations"],
            responses=responses(*AUTHENTICATED, 404),
            summary="The messages of a conversation, oldest first")
async def conversation_messages(
    request: Request,
    doc_id: str = Path(max_length=100),
    page: int = Query(1, ge=1, le=1_000_000),
    limit: int = Query(20, ge=1, le=MAX_LIMIT),
    sort: str | None = Query(None, description="default: createdAt (oldest first)"),
    role: str | None = Query(None, description="only messages of this role"),
    p: Principal = Depends(viewer),
) -> Any:
    s = state(request)
    await s.store.documents(_CONVERSATIONS.name).get(p.org_id, doc_id)  # 404 if not visible
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "conversationId"]
    if sort is None:
        params.append(("sort", "createdAt"))
    query = parse_list_query(params, _MESSAGES)
    payload = await list_json(s.store, s.pages, s.stamp_reads, p.org_id, _MESSAGES, query,
                              populate_refs(_MESSAGES, None), scope={"conversationId": doc_id})
    return Response(payload, media_type="application/json")

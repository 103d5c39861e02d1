"""Node actions: tokens, live metrics and containers, events, and commands."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from aiwm.auth import Principal
from aiwm.errors import NotFound
from aiwm.protocol import COMMANDS
from serve.deps import admin, operator, state, viewer
from serve.problems import AUTHENTICATED, responses

router = APIRouter(prefix="/nodes", tags=["nodes"], responses=responses(*AUTHENTICATED))
NodeId = Path(max_length=100, description="The node's id")


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expiresIn: int | None = Field(None, gt=0, le=10 * 365 * 86400, description="seconds")
    description: str | None = Field(None, max_length=500)


class NodeToken(BaseModel):
    nodeId: str
    token: str
    expiresAt: str
    expiresIn: int
    tokenId: str


@router.post("/{node_id}/token", status_code=201, response_model=NodeToken, responses=responses(404, 413),
             summary="Generate the node's token (admin); it replaces the previous one")
async def create_node_token(request: Request, body: TokenBody | None = None,
                            node_id: str = NodeId, p: Principal = Depends(admin)) -> Any:
    body = body or TokenBody()
    return await state(request).writer.call("issue_node_token", p, node_id, body.expiresIn,
                                            body.description)


@router.delete("/{node_id}/token", responses=responses(404),
               summary="Revoke the node's token and end its session (admin)")
async def revoke_node_token(request: Request, node_id: str = NodeId,
                            p: Principal = Depends(admin)) -> Any:
    node = await state(request).writer.call("revoke_node_token", p, node_id)
    return {"nodeId": node_id, "tokenMetadata": node.get("tokenMetadata")}


async def _latest_metrics(request: Request, p: Principal, node_id: str, limit: int) -> list[dict]:
    store = state(request).store
    await store.documents("nodes").get(p.org_id, node_id)  # 404 for unknown / other org
    return await store.node_metrics.recent(p.org_id, node_id, limit)


@router.get("/{node_id}/metrics", responses=responses(404),
            summary="The node's latest metrics, and recent history")
async def node_metrics(request: Request, node_id: str = NodeId,
                       history: int = Query(0, ge=0, le=1440, description="past reports too"),
                       p: Principal = Depends(viewer)) -> Any:
    reports = await _latest_metrics(request, p, node_id, history + 1)
    if not reports:
        raise NotFound(f"node {node_id!r} has reported no metrics yet")
    latest = {k: v for k, v in reports[0].items() if k not in ("orgId",)}
    return {"nodeId": node_id, "latest": latest, "history": reports[1:]}


@router.get("/{node_id}/containers", responses=responses(404),
            summary="Containers the node last reported")
async def node_containers(request: Request, node_id: str = NodeId,
                          p: Principal = Depends(viewer)) -> Any:
    reports = await _latest_metrics(request, p, node_id, 1)
    if not reports:
        raise NotFound(f"node {node_id!r} has reported no metrics yet")
    return {"nodeId": node_id, "reportedAt": reports[0]["at"],
            "containers": reports[0].get("containers", [])}


@router.get("/{node_id}/events", responses=responses(404),
            summary="What happened to the node, newest first")
async def node_events(request: Request, node_id: str = NodeId,
                      limit: int = Query(50, ge=1, le=500), p: Principal = Depends(viewer)) -> Any:
    store = state(request).store
    await store.documents("nodes").get(p.org_id, node_id)
    return {"data": await store.events.for_resource(p.org_id, "node", node_id, limit)}


class CommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description=f"one of {', '.join(COMMANDS)}")
    data: dict[str, Any] = Field(default_factory=dict)
    timeout: float = Field(30.0, gt=0, le=600, description="seconds to wait for the result")


def _proxy(request: Request, node_id: str, org_id: str) -> Any:
    return state(request).node(node_id, org_id)


@router.get("/{node_id}/commands/{command_id}", responses=responses(404),
            summary="Wait for the result of a command sent earlier (e.g. after a 504)")
async def node_command_result(request: Request, node_id: str = NodeId,
                              command_id: str = Path(max_length=100),
                              wait: float = Query(10.0, gt=0, le=600),
                              p: Principal = Depends(viewer)) -> Any:
    await state(request).store.documents("nodes").get(p.org_id, node_id)
    result = await _proxy(request, node_id, p.org_id).call("result", command_id, wait)
    return {"commandId": command_id, **result}


@router.post("/{node_id}/commands", responses=responses(404, 409, 413),
             summary="Send a command to the node and wait for its result")
async def node_command(body: CommandBody, request: Request, node_id: str = NodeId,
                       p: Principal = Depends(operator)) -> Any:
    result = await _proxy(request, node_id, p.org_id).command(body.type, body.data, body.timeout)
    return {"type": body.type, **result}

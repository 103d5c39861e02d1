"""Executions over REST: reads from the store, every change through the orchestrator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from aiwm.auth import Principal
from aiwm.errors import Unavailable, ValidationFailed
from aiwm.execution import Execution, ExecutionIn, ExecutionStatus, Step
from aiwm.models.base import Storable
from aiwm.query import MAX_LIMIT
from serve.crud import comma_list
from serve.deps import operator, state, viewer
from serve.problems import AUTHENTICATED, responses

router = APIRouter(prefix="/executions", tags=["executions"],
                   responses=responses(*AUTHENTICATED))
ExecutionId = Path(max_length=100, description="The execution's id")


class ExecutionPage(BaseModel):
    data: list[Execution]
    total: int
    page: int
    limit: int


class ExecutionPatch(Storable):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    metadata: dict[str, Any] | None = None


class Steps(BaseModel):
    executionId: str
    status: ExecutionStatus
    progress: int
    steps: list[Step]


def orchestrator(request: Request) -> Any:
    client = state(request).orchestrator
    if client is None:
        raise Unavailable("executions need the orchestrator actor, which this server lacks")
    return client


@router.post("", status_code=201, response_model=Execution, responses=responses(413),
             summary="Create an execution and start it (operator)")
async def create_execution(body: ExecutionIn, request: Request,
                           p: Principal = Depends(operator)) -> Any:
    return await orchestrator(request).call("create", p, body.model_dump(mode="json"))


@router.get("", response_model=ExecutionPage, summary="List executions, newest first")
async def list_executions(
    request: Request,
    status: str = Query(None, description="a status, or several separated by commas",
                        json_schema_extra={"pattern": comma_list(ExecutionStatus.__members__)}),
    resourceType: str | None = Query(None, max_length=50),
    resourceId: str | None = Query(None, max_length=200),
    page: int = Query(1, ge=1, le=1_000_000),
    limit: int = Query(20, ge=1, le=MAX_LIMIT),
    p: Principal = Depends(viewer),
) -> Any:
    query: dict[str, Any] = {"orgId": p.org_id}
    if status:
        wanted = [s.strip() for s in status.split(",") if s.strip()]
        bad = [s for s in wanted if s not in ExecutionStatus.__members__]
        if bad:
            raise ValidationFailed(f"unknown status {', '.join(bad)}", extra={"errors": [
                {"field": "query.status", "type": "enum",
                 "message": f"one of {', '.join(ExecutionStatus.__members__)}"}]})
        query["status"] = {"$in": wanted}
    if resourceType:
        query["resource.type"] = resourceType
    if resourceId:
        query["resource.id"] = resourceId
    docs, total = await state(request).store.executions.page(
        query, skip=(page - 1) * limit, limit=limit)
    return {"data": docs, "total": total, "page": page, "limit": limit}


@router.get("/{execution_id}", response_model=Execution, responses=responses(404),
            summary="An execution with its steps and their audit trails")
async def get_execution(request: Request, execution_id: str = ExecutionId,
                        p: Principal = Depends(viewer)) -> Any:
    return await state(request).store.executions.get(p.org_id, execution_id)


@router.get("/{execution_id}/steps", response_model=Steps, responses=responses(404),
            summary="The steps of an execution")
async def get_steps(request: Request, execution_id: str = ExecutionId,
                    p: Principal = Depends(viewer)) -> Any:
    doc = await state(request).store.executions.get(p.org_id, execution_id)
    return {"executionId": doc["id"], "status": doc["status"], "progress": doc["progress"],
            "steps": doc["steps"]}


@router.get("/{execution_id}/wait", response_model=Execution, responses=responses(404),
            summary="Wait until the execution finishes (or `timeout` passes); returns it")
async def wait_execution(request: Request, execution_id: str = ExecutionId,
                         timeout: float = Query(30.0, gt=0, le=300),
                         p: Principal = Depends(viewer)) -> Any:
    return await orchestrator(request).call("wait", p.org_id, execution_id, timeout)


@router.patch("/{execution_id}", response_model=Execution, responses=responses(404, 409, 413),
              summary="Change an execution's name, description or metadata (operator)")
async def update_execution(body: ExecutionPatch, request: Request,
                           execution_id: str = ExecutionId,
                           p: Principal = Depends(operator)) -> Any:
    changes = body.model_dump(exclude_unset=True)
    return await orchestrator(request).call("update", p, execution_id, changes)


@router.delete("/{execution_id}", response_model=Execution, responses=responses(404, 409),
               summary="Cancel an execution: running steps are told to stop (operator)")
async def cancel_execution(request: Request, execution_id: str = ExecutionId,
                           reason: str = Query("cancelled by request", max_length=500),
                           p: Principal = Depends(operator)) -> Any:
    return await orchestrator(request).call("cancel", p, execution_id, reason)


@router.post("/{execution_id}/retry", response_model=Execution, responses=responses(404, 409),
             summary="Run again the failed (and thereby skipped or cancelled) steps (operator)")
async def retry_execution(request: Request, execution_id: str = ExecutionId,
                          p: Principal = Depends(operator)) -> Any:
    return await orchestrator(request).call("retry", p, execution_id)

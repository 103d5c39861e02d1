"""Deployment actions: creating one deploys it; stop, restart and delete are executions
too. Logs and live stats come from the node."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from aiwm.auth import Principal
from aiwm.errors import InvalidState, NotFound
from aiwm.execution import Execution
from aiwm.models import entity
from serve.deps import operator, state, viewer
from serve.executions import orchestrator
from serve.problems import AUTHENTICATED, responses

router = APIRouter(prefix="/deployments", tags=["deployments"],
                   responses=responses(*AUTHENTICATED))
SPEC = entity("deployments")
DeploymentIn: Any = SPEC.create
DeploymentOut: Any = SPEC.read
DeploymentId = Path(max_length=100, description="The deployment's id")


class DeploymentAction(BaseModel):
    deployment: DeploymentOut  # type: ignore[valid-type]
    execution: Execution | None = Field(description="none for a forced delete")


async def _start(request: Request, p: Principal, deployment_id: str, purpose: str,
                 version: int | None = None) -> Any:
    execution = await orchestrator(request).call("run_for_deployment", p, deployment_id, purpose,
                                                 version)
    deployment = await state(request).store.documents("deployments").get(p.org_id, deployment_id)
    return {"deployment": deployment, "execution": execution}


@router.post("", status_code=201, response_model=DeploymentAction, responses=responses(409, 413),
             summary="Create a deployment and deploy it: download the model on the node, start "
                     "the server, route to it, check its health (operator)")
async def create_deployment(body: DeploymentIn, request: Request,  # type: ignore[valid-type]
                            p: Principal = Depends(operator)) -> Any:
    created = await state(request).writer.call("create", p, SPEC.name, body.model_dump(mode="json"))
    return await _start(request, p, created["id"], "deploy")


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modelVersion: int | None = Field(None, ge=1, le=2**31 - 1, description=(
        "the version of the model to deploy (going back to an earlier one, say); "
        "default: the latest"))


@router.post("/{deployment_id}/deploy", status_code=202, response_model=DeploymentAction,
             responses=responses(404, 409),
             summary="Deploy again: the model's latest version, or the one the body names "
                     "(after a failure or a stop, to move to a new version, or back to an "
                     "old one) (operator)")
async def redeploy(request: Request, deployment_id: str = DeploymentId,
                   body: DeployBody | None = None, p: Principal = Depends(operator)) -> Any:
    return await _start(request, p, deployment_id, "deploy",
                        body.modelVersion if body is not None else None)


@router.post("/{deployment_id}/stop", status_code=202, response_model=DeploymentAction,
             responses=responses(404, 409),
             summary="Stop the deployment's server and remove its route (operator)")
async def stop(request: Request, deployment_id: str = DeploymentId,
               p: Principal = Depends(operator)) -> Any:
    return await _start(request, p, deployment_id, "stop")


@router.post("/{deployment_id}/restart", status_code=202, response_model=DeploymentAction,
             responses=responses(404, 409),
             summary="Restart the deployment's server and check its health (operator)")
async def restart(request: Request, deployment_id: str = DeploymentId,
                  p: Principal = Depends(operator)) -> Any:
    return await _start(request, p, deployment_id, "restart")


# {doc_id} as in the CRUD routes' GET, PUT and PATCH: one path, not two that OpenAPI
# forbids (the same template with another parameter name)
@router.delete("/{doc_id}", status_code=202, response_model=DeploymentAction, responses=responses(404, 409),
               summary="Stop the deployment, then remove it (operator); `force` removes it at "
                       "once, leaving whatever runs on the node")
async def delete(request: Request,
                 doc_id: str = Path(max_length=100, description="The deployment's id"),
                 force: bool = Query(False), p: Principal = Depends(operator)) -> Any:
    if force:
        current = await state(request).store.documents("deployments").get(p.org_id, doc_id)
        if current.get("executionId"):  # whatever it was doing is moot now (no-op if finished)
            await orchestrator(request).call("cancel", p, current["executionId"],
                                             "the deployment was removed (force)")
        deployment = await state(request).writer.call("delete", p, SPEC.name, doc_id, None)
        return {"deployment": deployment, "execution": None}
    return await _start(request, p, doc_id, "delete")


async def _ask_node(request: Request, p: Principal, deployment_id: str, command: str,
                    data: dict[str, Any]) -> dict[str, Any]:
    deployment = await state(request).store.documents("deployments").get(p.org_id, deployment_id)
    node = state(request).node(deployment["nodeId"], p.org_id)
    reply = await node.call("execute", command, {"deploymentId": deployment_id, **data}, 15.0)
    if not reply.get("success"):
        err = reply.get("error") or {}
        if err.get("code") == "not_found":
            raise NotFound(f"deployment {deployment_id!r} is not running on node "
                           f"{deployment['nodeId']}: {err.get('message')}")
        raise InvalidState(f"node {deployment['nodeId']} could not answer {command}: "
                           f"{err.get('code')}: {err.get('message')}")
    return reply["result"]  # type: ignore[no-any-return]


@router.get("/{deployment_id}/logs", responses=responses(404, 409),
            summary="The last lines of the server's log, from its node")
async def logs(request: Request, deployment_id: str = DeploymentId,
               tail: int = Query(200, ge=1, le=10_000), p: Principal = Depends(viewer)) -> Any:
    return await _ask_node(request, p, deployment_id, "deployment.getLogs", {"tail": tail})


@router.get("/{deployment_id}/metrics", responses=responses(404, 409),
            summary="The server's live resource use from its node, and its gateway route")
async def metrics(request: Request, deployment_id: str = DeploymentId,
                  p: Principal = Depends(viewer)) -> Any:
    stats = await _ask_node(request, p, deployment_id, "deployment.getStats", {})
    deployment = await state(request).store.documents("deployments").get(p.org_id, deployment_id)
    return {"deploymentId": deployment_id, "status": deployment.get("status"),
            "route": deployment.get("route"), "endpoint": deployment.get("endpoint"),
            "runtime": stats}


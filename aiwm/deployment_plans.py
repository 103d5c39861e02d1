"""What deploying, stopping, restarting and deleting a deployment take, as executions.

Pure: a deployment and its model in, an :class:`ExecutionIn` out. The orchestrator runs
the plan and, when it ends, moves the deployment's status (:func:`status_after`).
"""

from __future__ import annotations

from typing import Any

from aiwm.execution import Backoff, Execution, ExecutionIn, ExecutionStatus, ResourceRef, StepIn

PURPOSES = ("deploy", "stop", "restart", "delete")
# The model server gets this long to answer its health check after it started.
HEALTH_RETRIES = 30
HEALTH_BACKOFF = Backoff(initialSeconds=0.2, factor=1.5, maxSeconds=5.0)


def node_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    """The ``deployment.create`` / ``deployment.restart`` command data."""
    resources = deployment.get("resources") or {}
    return {
        "deploymentId": deployment["id"],
        "runtime": deployment.get("runtime", "docker"),
        "image": deployment.get("image"),
        "command": list(deployment.get("command") or []),
        "env": dict(deployment.get("env") or {}),
        "port": deployment.get("port", 8000),
        "gpus": resources.get("gpus", 0),
        "memoryMb": resources.get("memoryMb"),
        "cpus": resources.get("cpus"),
        "modelId": deployment.get("modelId"),
        "modelVersion": deployment.get("modelVersion"),  # the version its last deploy fetched
        "healthPath": deployment.get("healthPath") or "/health",
    }


def _execution(purpose: str, deployment: dict[str, Any], steps: list[StepIn],
               timeout: float = 3600.0) -> ExecutionIn:
    return ExecutionIn(
        name=f"{purpose} {deployment.get('name') or deployment['id']}",
        resource=ResourceRef(type="deployment", id=deployment["id"]),
        steps=steps,
        timeoutSeconds=timeout,
        metadata={"purpose": purpose, "deploymentId": deployment["id"]},
    )


def _serve_steps(deployment: dict[str, Any], start: StepIn) -> list[StepIn]:
    """Start (or restart) the server, install its route, check its health."""
    dep_id = deployment["id"]
    return [
        start,
        StepIn(name="route", kind="controller", command="gateway.configure",
               data={"deploymentId": dep_id, "fromStep": start.name},
               dependsOn=[start.name], timeoutSeconds=30),
        StepIn(name="health", kind="controller", command="deployment.healthCheck",
               data={"deploymentId": dep_id, "nodeId": deployment["nodeId"],
                     "path": deployment.get("healthPath") or "/health"},
               dependsOn=["route"], maxRetries=HEALTH_RETRIES, backoff=HEALTH_BACKOFF,
               timeoutSeconds=30),
    ]


def deploy_plan(deployment: dict[str, Any], model: dict[str, Any],
                files: list[dict[str, Any]] | None = None,
                version: int | None = None) -> ExecutionIn:
    """download the model on the node -> start the server -> route -> health check.
    ``version``: the stored version to fetch and start from (None: the model has none)."""
    node_id = deployment["nodeId"]
    data: dict[str, Any] = {"modelId": model["id"], "name": model.get("name"),
                            "files": files or []}
    if version is not None:
        data["version"] = version
    download = StepIn(name="download", kind="node", nodeId=node_id, command="model.download",
                      data=data, timeoutSeconds=6 * 3600)
    start = StepIn(name="start", kind="node", nodeId=node_id, command="deployment.create",
                   data=node_spec({**deployment, "modelVersion": version}),
                   dependsOn=["download"], timeoutSeconds=900)
    steps = [download, *_serve_steps(deployment, start)]
    if version is not None:
        # Once the new server runs, the node drops the model's versions nothing there uses
        # any more (the one this deployment ran before, say), beside the health check.
        steps.append(_tidy(node_id, model["id"], [version], after="start"))
    # The download alone may take hours (its step allows 6 h); the whole run gets 7.
    return _execution("deploy", deployment, steps, timeout=7 * 3600)


def _tidy(node_id: str, model_id: str, keep: list[int], *, after: str) -> StepIn:
    """``model.prune``: the node removes the model's version folders but those in ``keep``.
    The controller adds to ``keep`` what deployments and executions need when it sends the
    step. Optional and short, so a failure (or an agent too old to know the command, which
    drops it) leaves folders behind and never fails the run."""
    return StepIn(name="tidy", kind="node", nodeId=node_id, command="model.prune",
                  data={"modelId": model_id, "keep": keep}, dependsOn=[after],
                  optional=True, maxRetries=0, timeoutSeconds=60)


def restart_plan(deployment: dict[str, Any]) -> ExecutionIn:
    start = StepIn(name="restart", kind="node", nodeId=deployment["nodeId"],
                   command="deployment.restart", data=node_spec(deployment), timeoutSeconds=900)
    return _execution("restart", deployment, _serve_steps(deployment, start))


def stop_plan(deployment: dict[str, Any], purpose: str = "stop") -> ExecutionIn:
    """Take the route away, then stop the server (delete: the same, then remove it, and
    the node drops the version it ran unless something else there needs it)."""
    dep_id = deployment["id"]
    steps = [
        StepIn(name="unroute", kind="controller", command="gateway.remove",
               data={"deploymentId": dep_id}, timeoutSeconds=30),
        StepIn(name="stop", kind="node", nodeId=deployment["nodeId"], command="deployment.stop",
               data={"deploymentId": dep_id}, dependsOn=["unroute"], timeoutSeconds=300),
    ]
    if purpose == "delete" and deployment.get("modelVersion") and deployment.get("modelId"):
        steps.append(_tidy(deployment["nodeId"], deployment["modelId"], [], after="stop"))
    return _execution(purpose, deployment, steps)


def status_on_start(purpose: str) -> str:
    return {"deploy": "deploying", "restart": "deploying"}.get(purpose, "stopping")


def status_after(execution: Execution) -> dict[str, Any]:
    """The deployment's fields once its execution ended (``{}``: nothing to change;
    ``{"deleted": True}``: remove the deployment)."""
    purpose = execution.metadata.get("purpose")
    if execution.status == ExecutionStatus.completed:
        if purpose == "delete":
            return {"deleted": True}
        if purpose in ("deploy", "restart"):
            return {"status": "running", "error": None}
        return {"status": "stopped", "error": None, "endpoint": None}
    if execution.status in (ExecutionStatus.failed, ExecutionStatus.cancelled):
        why = execution.error.message if execution.error else execution.status.value
        return {"status": "failed", "error": f"{purpose} failed: {why}"}
    return {}

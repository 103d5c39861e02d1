"""What an execution is: its steps, their retry policy and timeouts, and its state.

Clients send :class:`ExecutionIn`; :func:`new_execution` checks the step graph (no
cycles, no unknown or duplicate names) and returns the :class:`Execution` the
orchestrator stores. The state changes live in :mod:`aiwm.execution.machine`.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aiwm.errors import ValidationFailed
from aiwm.models.base import Storable
from aiwm.protocol import COMMAND_DATA, COMMANDS


class StepStatus(str, Enum):
    pending = "pending"
    running = "running"
    retrying = "retrying"  # an attempt failed; the next one waits for its backoff
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"  # a dependency did not succeed
    cancelled = "cancelled"


class ExecutionStatus(str, Enum):
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({ExecutionStatus.completed, ExecutionStatus.failed, ExecutionStatus.cancelled})
STEP_DONE = frozenset({StepStatus.succeeded, StepStatus.failed, StepStatus.skipped,
                       StepStatus.cancelled})


class Backoff(BaseModel):
    """Delay before retry n (0-based): ``initialSeconds * factor**n``, at most ``maxSeconds``."""

    model_config = ConfigDict(extra="forbid")

    initialSeconds: float = Field(1.0, ge=0, le=3600)
    factor: float = Field(2.0, ge=1, le=10)
    maxSeconds: float = Field(60.0, ge=0, le=86400)

    def delay(self, retry: int) -> float:
        try:
            return float(min(self.maxSeconds, self.initialSeconds * self.factor ** min(retry, 64)))
        except OverflowError:
            return self.maxSeconds


class StepError(BaseModel):
    code: str
    message: str
    retryable: bool = True


class StepIn(Storable):
    """One step as a client writes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    kind: Literal["node", "controller"] = "node"
    nodeId: str | None = Field(None, max_length=100, description="node steps: where it runs")
    command: str = Field(min_length=1, max_length=100,
                         description="node steps: a node command (e.g. system.healthCheck); "
                                     "controller steps: a controller action (e.g. wait, http.check)")
    data: dict[str, Any] = Field(default_factory=dict)
    dependsOn: list[int | str] = Field(default_factory=list, max_length=100,
                                       description="indexes or names of earlier-or-later steps")
    optional: bool = Field(False, description="may fail without failing the execution")
    maxRetries: int | None = Field(None, ge=0, le=100,
                                   description="default: EXECUTION_MAX_RETRIES")
    backoff: Backoff = Field(default_factory=Backoff)
    timeoutSeconds: float = Field(300.0, gt=0, le=7 * 86400, description="per attempt")


class ResourceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=50)
    id: str = Field(min_length=1, max_length=200)


class ExecutionIn(Storable):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    resource: ResourceRef | None = None
    steps: list[StepIn] = Field(min_length=1, max_length=200)
    timeoutSeconds: float = Field(3600.0, gt=0, le=30 * 86400, description="whole execution")
    metadata: dict[str, Any] = Field(default_factory=dict)


class Step(BaseModel):
    """A step and its state."""

    index: int
    name: str
    kind: Literal["node", "controller"]
    nodeId: str | None = None
    command: str
    data: dict[str, Any] = Field(default_factory=dict)
    dependsOn: list[int] = Field(default_factory=list)
    optional: bool = False
    maxRetries: int = 3
    backoff: Backoff = Field(default_factory=Backoff)
    timeoutSeconds: float = 300.0
    status: StepStatus = StepStatus.pending
    attempts: int = 0
    startedAt: dt.datetime | None = None
    finishedAt: dt.datetime | None = None
    attemptTimeoutAt: dt.datetime | None = None
    nextAttemptAt: dt.datetime | None = None
    commandId: str | None = None
    result: dict[str, Any] | None = None
    error: StepError | None = None
    progress: dict[str, Any] | None = Field(None, description="how far the running attempt got")
    messages: list[dict[str, Any]] = Field(default_factory=list,
                                           description="audit trail: every message sent or received")

    @property
    def done(self) -> bool:
        return self.status in STEP_DONE


class Execution(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    orgId: str
    createdBy: str
    name: str
    description: str | None = None
    resource: ResourceRef | None = None
    status: ExecutionStatus = ExecutionStatus.pending
    progress: int = 0
    steps: list[Step]
    timeoutSeconds: float = 3600.0
    timeoutAt: dt.datetime
    retryCount: int = 0
    abort: Literal["cancelled", "deadline"] | None = None
    error: StepError | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    correlationId: str | None = None  # of the request that created it (aiwm/logs.py)
    createdAt: dt.datetime
    updatedAt: dt.datetime
    startedAt: dt.datetime | None = None
    finishedAt: dt.datetime | None = None
    version: int = 1

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def new_execution(
    spec: ExecutionIn, *, execution_id: str, org_id: str, created_by: str, now: dt.datetime,
    default_max_retries: int, controller_actions: frozenset[str] | None = None,
) -> Execution:
    """An execution ready to start, or :class:`ValidationFailed` listing every problem."""
    names = [s.name for s in spec.steps]
    problems: list[dict[str, str]] = []

    def problem(field: str, message: str, kind: str) -> None:
        problems.append({"field": f"body.{field}", "message": message, "type": kind})

    for i, name in enumerate(names):
        if names.index(name) != i:
            problem(f"steps.{i}.name", f"duplicate step name {name!r}", "duplicate")
    steps: list[Step] = []
    for i, s in enumerate(spec.steps):
        deps: list[int] = []
        for d in s.dependsOn:
            target = d if isinstance(d, int) else (names.index(d) if d in names else -1)
            if not 0 <= target < len(names):
                problem(f"steps.{i}.dependsOn", f"no step {d!r}", "unknown_step")
            elif target == i:
                problem(f"steps.{i}.dependsOn", "a step cannot depend on itself", "cycle")
            elif target not in deps:
                deps.append(target)
        if s.kind == "node":
            if not s.nodeId:
                problem(f"steps.{i}.nodeId", "a node step needs nodeId", "missing")
            if s.command not in COMMANDS:
                problem(f"steps.{i}.command", f"unknown node command {s.command!r}; "
                        f"known: {', '.join(COMMANDS)}", "unknown_command")
            else:  # the command's data is checked now, not when the step is dispatched
                try:
                    COMMAND_DATA[s.command].model_validate(s.data)
                except ValidationError as e:
                    for err in e.errors():
                        where = ".".join(str(p) for p in err["loc"])
                        problem(f"steps.{i}.data" + (f".{where}" if where else ""),
                                err["msg"], err["type"])
        elif controller_actions is not None and s.command not in controller_actions:
            problem(f"steps.{i}.command", f"unknown controller action {s.command!r}; "
                    f"known: {', '.join(sorted(controller_actions))}", "unknown_command")
        steps.append(Step(
            index=i, name=s.name, kind=s.kind, nodeId=s.nodeId, command=s.command, data=s.data,
            dependsOn=deps, optional=s.optional,
            maxRetries=default_max_retries if s.maxRetries is None else s.maxRetries,
            backoff=s.backoff, timeoutSeconds=s.timeoutSeconds))
    cycle = find_cycle(steps)  # bad dependencies were left out above: the graph is checkable
    if cycle:
        path = " -> ".join(steps[i].name for i in cycle)
        problem("steps", f"dependsOn forms a cycle: {path}", "cycle")
    if problems:
        raise ValidationFailed(f"invalid execution: {problems[0]['message']}",
                               extra={"errors": problems})
    return Execution(
        id=execution_id, orgId=org_id, createdBy=created_by, name=spec.name,
        description=spec.description, resource=spec.resource, steps=steps,
        timeoutSeconds=spec.timeoutSeconds,
        timeoutAt=now + dt.timedelta(seconds=spec.timeoutSeconds),
        metadata=spec.metadata, createdAt=now, updatedAt=now)


def find_cycle(steps: list[Step]) -> list[int]:
    """A dependency cycle as step indexes (first repeated at the end), or []."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = [WHITE] * len(steps)
    stack: list[int] = []

    def visit(i: int) -> list[int]:
        color[i] = GREY
        stack.append(i)
        for d in steps[i].dependsOn:
            if color[d] == GREY:
                return [*stack[stack.index(d):], d]
            if color[d] == WHITE:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[i] = BLACK
        return []

    for i in range(len(steps)):
        if color[i] == WHITE:
            found = visit(i)
            if found:
                return found
    return []

"""Executions: durable multi-step workflows. The model and the pure state machine; the
ExecutionOrchestrator actor (actors/orchestrator.py) persists and dispatches."""

from aiwm.execution.machine import (
    Abort,
    Cancel,
    Decision,
    Dispatch,
    Event,
    Rejected,
    Retry,
    StepFailed,
    StepProgress,
    StepSucceeded,
    Tick,
    decide,
    record,
)
from aiwm.execution.model import (
    STEP_DONE,
    TERMINAL,
    Backoff,
    Execution,
    ExecutionIn,
    ExecutionStatus,
    ResourceRef,
    Step,
    StepError,
    StepIn,
    StepStatus,
    find_cycle,
    new_execution,
)

__all__ = [
    "Abort", "Backoff", "Cancel", "Decision", "Dispatch", "Event", "Execution", "ExecutionIn",
    "ExecutionStatus", "Rejected", "ResourceRef", "Retry", "STEP_DONE", "Step", "StepError",
    "StepFailed", "StepIn", "StepProgress", "StepStatus", "StepSucceeded", "TERMINAL", "Tick", "decide",
    "find_cycle", "new_execution", "record",
]

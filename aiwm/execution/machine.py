"""The execution state machine: events in, a new state and actions out. Pure.

The orchestrator actor feeds it events (a step's result, a tick of the clock, a cancel,
a retry), stores the new state, and only then carries out the actions: dispatch a step
attempt, abort a running one, arm a timer for :attr:`Decision.wake_at`. The clock is a
parameter, so tests drive time by hand.

Rules:
- a step starts only when every step it depends on has succeeded; a step whose
  dependency failed as an optional step is skipped, and a skip does not fail the run;
- a failed attempt is retried after its backoff while retries remain and its error is
  retryable; a timed-out attempt counts as a retryable failure;
- a required step that fails for good fails the execution at once: running steps are
  aborted, waiting ones skipped (fail fast);
- the execution's deadline works the same way; cancel aborts and cancels everything;
- results are matched to the attempt that produced them: a late or repeated one changes
  nothing;
- progress counts the steps whose work is done, so it never goes down, not even when a
  retry puts failed steps back to pending.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from aiwm.execution.model import (
    Execution,
    ExecutionStatus,
    Step,
    StepError,
    StepStatus,
)

# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed: start what is ready, time out what is overdue."""


@dataclass(frozen=True)
class StepSucceeded:
    index: int
    attempt: int
    result: dict[str, Any] = field(default_factory=dict)
    messages: tuple[dict[str, Any], ...] = ()  # for the step's audit trail


@dataclass(frozen=True)
class StepFailed:
    index: int
    attempt: int
    error: StepError
    messages: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class StepProgress:
    """A running attempt says how far it got (bytes, files...); shown as the step's
    ``progress``. Ignored once that attempt is over."""

    index: int
    attempt: int
    progress: dict[str, Any]


@dataclass(frozen=True)
class Cancel:
    reason: str = "cancelled by request"


@dataclass(frozen=True)
class Retry:
    """Run again the steps that kept a failed or cancelled execution from completing."""


Event = Tick | StepSucceeded | StepFailed | StepProgress | Cancel | Retry


# --- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    index: int
    attempt: int


@dataclass(frozen=True)
class Abort:
    index: int
    attempt: int
    command_id: str | None


@dataclass
class Decision:
    execution: Execution
    dispatch: list[Dispatch] = field(default_factory=list)
    abort: list[Abort] = field(default_factory=list)
    wake_at: dt.datetime | None = None  # the next moment a Tick may change something
    changed: bool = False  # the state differs from the one passed in (store it)
    finished: bool = False  # this event moved the execution to a terminal status


class Rejected(Exception):
    """The event is not allowed in the execution's current status (e.g. retry of a
    running execution); the state is unchanged."""


def decide(execution: Execution, event: Event, now: dt.datetime) -> Decision:
    """Apply ``event`` at ``now``; the input is not modified."""
    ex = execution.model_copy(deep=True)
    out = Decision(execution=ex)
    before = ex.model_dump()
    was_terminal = ex.terminal
    if isinstance(event, Retry):
        _retry(ex, now)
    elif was_terminal:
        pass  # late results and ticks of a finished execution change nothing
    elif isinstance(event, StepSucceeded):
        step = _current(ex, event.index, event.attempt)
        if step is not None:
            step.messages.extend(event.messages)
            _finish(step, StepStatus.succeeded, now, result=event.result)
    elif isinstance(event, StepFailed):
        step = _current(ex, event.index, event.attempt)
        if step is not None:
            step.messages.extend(event.messages)
            _attempt_failed(step, event.error, now)
    elif isinstance(event, StepProgress):
        step = _current(ex, event.index, event.attempt)
        if step is not None:
            step.progress = event.progress
    elif isinstance(event, Cancel):
        ex.abort = "cancelled"
        ex.error = StepError(code="cancelled", message=event.reason, retryable=True)
    if not ex.terminal:
        _advance(ex, now, out)
    _settle(ex, now)
    # A retry can settle at once (nothing left that may run): that is a new finish too.
    out.finished = ex.terminal and (not was_terminal or isinstance(event, Retry))
    if out.finished:
        ex.finishedAt = now
    ex.progress = _progress(ex)
    out.wake_at = _next_wake(ex)
    out.changed = ex.model_dump() != before
    if out.changed:
        ex.updatedAt = now
    return out


def _current(ex: Execution, index: int, attempt: int) -> Step | None:
    """The step if ``attempt`` is the one it is running now, else None (stale or repeat)."""
    if not 0 <= index < len(ex.steps):
        return None
    step = ex.steps[index]
    if step.status != StepStatus.running or step.attempts != attempt:
        return None
    return step


def _finish(step: Step, status: StepStatus, now: dt.datetime, *,
            result: dict[str, Any] | None = None, error: StepError | None = None) -> None:
    step.status = status
    step.finishedAt = now
    step.attemptTimeoutAt = None
    step.nextAttemptAt = None
    if result is not None:
        step.result = result
        step.error = None
    if error is not None:
        step.error = error


def _attempt_failed(step: Step, error: StepError, now: dt.datetime) -> None:
    retries_used = step.attempts - 1
    if error.retryable and retries_used < step.maxRetries:
        step.status = StepStatus.retrying
        step.error = error
        step.attemptTimeoutAt = None
        step.nextAttemptAt = now + dt.timedelta(seconds=step.backoff.delay(retries_used))
    else:
        _finish(step, StepStatus.failed, now, error=error)


def _advance(ex: Execution, now: dt.datetime, out: Decision) -> None:
    """Time out what is overdue, then start what is ready (or stop everything)."""
    if ex.abort is None and now >= ex.timeoutAt and not all(s.done for s in ex.steps):
        ex.abort = "deadline"
        ex.error = StepError(code="deadline_exceeded", retryable=True,
                             message=f"the execution did not finish within {ex.timeoutSeconds:g}s")
    for step in ex.steps:
        if (step.status == StepStatus.running and step.attemptTimeoutAt is not None
                and now >= step.attemptTimeoutAt):
            out.abort.append(Abort(step.index, step.attempts, step.commandId))
            _attempt_failed(step, StepError(
                code="timeout", message=f"attempt {step.attempts} did not finish within "
                f"{step.timeoutSeconds:g}s", retryable=True), now)
    if ex.abort is not None or _required_failed(ex):
        _stop_all(ex, now, out)
        return
    changed = True
    while changed:  # skips can make more skips
        changed = False
        for step in ex.steps:
            if step.status != StepStatus.pending:
                continue
            deps = [ex.steps[d] for d in step.dependsOn]
            if any(d.status in (StepStatus.failed, StepStatus.skipped, StepStatus.cancelled)
                   for d in deps):
                _finish(step, StepStatus.skipped, now, error=StepError(
                    code="dependency_failed", retryable=True,
                    message="skipped: " + ", ".join(d.name for d in deps
                                                    if d.status != StepStatus.succeeded)))
                changed = True
    for step in ex.steps:
        ready = (step.status == StepStatus.pending
                 and all(ex.steps[d].status == StepStatus.succeeded for d in step.dependsOn))
        due = (step.status == StepStatus.retrying and step.nextAttemptAt is not None
               and now >= step.nextAttemptAt)
        if ready or due:
            step.status = StepStatus.running
            step.attempts += 1
            step.commandId = None
            step.nextAttemptAt = None
            step.finishedAt = None
            step.progress = None
            step.startedAt = step.startedAt if due else now
            step.attemptTimeoutAt = now + dt.timedelta(seconds=step.timeoutSeconds)
            out.dispatch.append(Dispatch(step.index, step.attempts))
            if ex.startedAt is None:
                ex.startedAt = now


def _required_failed(ex: Execution) -> bool:
    return any(s.status == StepStatus.failed and not s.optional for s in ex.steps)


def _stop_all(ex: Execution, now: dt.datetime, out: Decision) -> None:
    """Fail fast: abort running steps; steps not started are skipped (cancelled on cancel)."""
    code = ex.abort or "execution_failed"
    waiting = StepStatus.cancelled if ex.abort == "cancelled" else StepStatus.skipped
    for step in ex.steps:
        if step.status == StepStatus.running:
            out.abort.append(Abort(step.index, step.attempts, step.commandId))
            _finish(step, StepStatus.cancelled, now, error=StepError(
                code=code, message="stopped: " + _why(ex), retryable=True))
        elif step.status in (StepStatus.pending, StepStatus.retrying):
            _finish(step, waiting, now, error=StepError(
                code=code, message="not run: " + _why(ex), retryable=True))


def _why(ex: Execution) -> str:
    if ex.error is not None:
        return ex.error.message
    failed = [s.name for s in ex.steps if s.status == StepStatus.failed and not s.optional]
    return f"step {', '.join(failed)} failed" if failed else "execution stopped"


def _settle(ex: Execution, now: dt.datetime) -> None:
    """Derive the execution's status from its steps."""
    if all(s.done for s in ex.steps):
        if ex.abort == "cancelled":
            ex.status = ExecutionStatus.cancelled
        elif ex.abort == "deadline" or _required_failed(ex):
            ex.status = ExecutionStatus.failed
            if ex.error is None:
                failed = next(s for s in ex.steps if s.status == StepStatus.failed and not s.optional)
                ex.error = StepError(code="step_failed", retryable=True,
                                     message=f"step {failed.name!r} failed: "
                                     f"{failed.error.message if failed.error else 'unknown error'}")
        elif any(s.status == StepStatus.cancelled for s in ex.steps):
            ex.status = ExecutionStatus.cancelled
        else:
            ex.status = ExecutionStatus.completed
            ex.error = None
    elif any(s.attempts > 0 for s in ex.steps):
        ex.status = ExecutionStatus.running
    else:
        ex.status = ExecutionStatus.pending


def _retry(ex: Execution, now: dt.datetime) -> None:
    if ex.status not in (ExecutionStatus.failed, ExecutionStatus.cancelled):
        raise Rejected(f"only a failed or cancelled execution can be retried; this one is "
                       f"{ex.status.value}")
    for step in ex.steps:
        if step.status == StepStatus.succeeded or (step.status == StepStatus.failed and step.optional):
            continue
        if step.status == StepStatus.skipped and step.error is not None \
                and step.error.code == "dependency_failed" and _skipped_by_optional(ex, step):
            continue
        step.status = StepStatus.pending
        step.attempts = 0
        step.error = None
        step.result = None
        step.progress = None
        step.commandId = None
        step.startedAt = step.finishedAt = step.attemptTimeoutAt = step.nextAttemptAt = None
    ex.abort = None
    ex.error = None
    ex.finishedAt = None
    ex.retryCount += 1
    ex.timeoutAt = now + dt.timedelta(seconds=ex.timeoutSeconds)
    ex.status = ExecutionStatus.running


def _skipped_by_optional(ex: Execution, step: Step) -> bool:
    """True when the step was skipped only because an optional dependency failed (its
    chain is settled; a retry leaves it alone)."""
    deps = [ex.steps[d] for d in step.dependsOn]
    blockers = [d for d in deps if d.status != StepStatus.succeeded]
    return bool(blockers) and all(
        (d.status == StepStatus.failed and d.optional)
        or (d.status == StepStatus.skipped and _skipped_by_optional(ex, d)) for d in blockers)


def _counts_as_done(ex: Execution, step: Step) -> bool:
    if step.status == StepStatus.succeeded:
        return True
    if step.status == StepStatus.failed and step.optional:
        return True
    return step.status == StepStatus.skipped and _skipped_by_optional(ex, step)


def _progress(ex: Execution) -> int:
    if ex.status == ExecutionStatus.completed:
        return 100
    done = sum(1 for s in ex.steps if _counts_as_done(ex, s))
    return int(100 * done / len(ex.steps))


def _next_wake(ex: Execution) -> dt.datetime | None:
    if ex.terminal:
        return None
    times = [ex.timeoutAt]
    for step in ex.steps:
        if step.status == StepStatus.running and step.attemptTimeoutAt is not None:
            times.append(step.attemptTimeoutAt)
        elif step.status == StepStatus.retrying and step.nextAttemptAt is not None:
            times.append(step.nextAttemptAt)
    return min(times)


def record(step: Step, direction: str, kind: str, *, at: dt.datetime, limit: int = 200,
           **detail: Any) -> None:
    """Add a message to the step's audit trail (the oldest go first past ``limit``)."""
    step.messages.append({"at": at, "direction": direction, "type": kind,
                          "attempt": step.attempts, **detail})
    if len(step.messages) > limit:
        del step.messages[: len(step.messages) - limit]

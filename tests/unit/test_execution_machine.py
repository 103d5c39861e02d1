"""The execution model and state machine, by example: validation of the step graph, then
events in, state and actions out. Pure: the clock is passed by hand, nothing sleeps.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from aiwm.errors import ValidationFailed
from aiwm.execution import (
    Abort,
    Backoff,
    Cancel,
    Decision,
    Dispatch,
    Event,
    Execution,
    ExecutionIn,
    ExecutionStatus,
    Rejected,
    Retry,
    StepError,
    StepFailed,
    StepIn,
    StepStatus,
    StepSucceeded,
    Tick,
    decide,
    new_execution,
    record,
)

T0 = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
BOOM = StepError(code="boom", message="it broke", retryable=True)
FATAL = StepError(code="fatal", message="it broke for good", retryable=False)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def ctrl(name: str, *deps: int | str, **fields: Any) -> StepIn:
    """A controller step (no node needed)."""
    return StepIn(name=name, kind="controller", command="wait", dependsOn=list(deps), **fields)


def build(*steps: StepIn, timeout: float = 3600.0, max_retries: int = 3,
          controller_actions: frozenset[str] | None = None) -> Execution:
    return new_execution(
        ExecutionIn(name="test", steps=list(steps), timeoutSeconds=timeout),
        execution_id="ex-1", org_id="org-1", created_by="user-1", now=T0,
        default_max_retries=max_retries, controller_actions=controller_actions)


def problems(*steps: StepIn, controller_actions: frozenset[str] | None = None) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as info:
        build(*steps, controller_actions=controller_actions)
    errors: list[dict[str, str]] = info.value.extra["errors"]
    assert info.value.detail == f"invalid execution: {errors[0]['message']}"
    return errors


def statuses(ex: Execution) -> list[StepStatus]:
    return [s.status for s in ex.steps]


class Driver:
    """Feeds events to the machine, keeping the latest state (and checking the input
    passed to :func:`decide` is never modified)."""

    def __init__(self, ex: Execution) -> None:
        self.ex = ex

    def __call__(self, event: Event, seconds: float) -> Decision:
        before = self.ex.model_dump()
        decision = decide(self.ex, event, at(seconds))
        assert self.ex.model_dump() == before
        self.ex = decision.execution
        return decision


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("dep", [0, "a"], ids=["index", "name"])
def test_a_step_depending_on_itself_is_a_cycle(dep: int | str) -> None:
    assert problems(ctrl("a", dep)) == [{"field": "body.steps.0.dependsOn", "type": "cycle",
                                         "message": "a step cannot depend on itself"}]


def test_a_two_step_cycle_is_named() -> None:
    [error] = problems(ctrl("a", "b"), ctrl("b", 0))
    assert error["field"] == "body.steps"
    assert error["type"] == "cycle"
    assert error["message"] == "dependsOn forms a cycle: a -> b -> a"


def test_a_three_step_cycle_is_named_behind_a_valid_prefix() -> None:
    [error] = problems(ctrl("start"), ctrl("a", "start", "c"), ctrl("b", "a"), ctrl("c", "b"),
                       ctrl("end", "c"))
    assert error["type"] == "cycle"
    assert error["message"] == "dependsOn forms a cycle: a -> c -> b -> a"


@pytest.mark.parametrize("dep", ["nope", 2, -1], ids=["name", "index_past_end", "negative_index"])
def test_unknown_dependency(dep: int | str) -> None:
    assert problems(ctrl("a"), ctrl("b", dep)) == [
        {"field": "body.steps.1.dependsOn", "type": "unknown_step", "message": f"no step {dep!r}"}]


def test_duplicate_names_are_reported_at_each_repeat() -> None:
    errors = problems(ctrl("a"), ctrl("b"), ctrl("a"), ctrl("a"))
    assert [(e["field"], e["type"]) for e in errors] == [
        ("body.steps.2.name", "duplicate"), ("body.steps.3.name", "duplicate")]
    assert errors[0]["message"] == "duplicate step name 'a'"


def test_node_step_needs_a_node_id_and_a_known_command() -> None:
    errors = problems(StepIn(name="a", command="system.healthCheck"),
                      StepIn(name="b", nodeId="n1", command="system.reboot"))
    assert [(e["field"], e["type"]) for e in errors] == [
        ("body.steps.0.nodeId", "missing"), ("body.steps.1.command", "unknown_command")]
    assert "unknown node command 'system.reboot'" in errors[1]["message"]
    assert "system.healthCheck" in errors[1]["message"]  # it lists the known ones


def test_a_valid_node_step_is_accepted() -> None:
    ex = build(StepIn(name="a", nodeId="n1", command="system.healthCheck"))
    assert ex.steps[0].kind == "node" and ex.steps[0].nodeId == "n1"


def test_controller_actions_are_checked_only_when_given() -> None:
    build(StepIn(name="a", kind="controller", command="anything.goes"))
    [error] = problems(StepIn(name="a", kind="controller", command="nope"),
                       controller_actions=frozenset({"wait", "http.check"}))
    assert error["field"] == "body.steps.0.command" and error["type"] == "unknown_command"
    assert "known: http.check, wait" in error["message"]


def test_every_problem_is_listed_in_order() -> None:
    errors = problems(
        ctrl("a", "a"),                                  # self-dependency
        ctrl("b", "ghost", 9),                           # two unknown dependencies
        ctrl("a"),                                       # duplicate name
        StepIn(name="d", command="bogus"),               # no nodeId, unknown command
    )
    assert [(e["field"], e["type"]) for e in errors] == [
        ("body.steps.2.name", "duplicate"),
        ("body.steps.0.dependsOn", "cycle"),
        ("body.steps.1.dependsOn", "unknown_step"),
        ("body.steps.1.dependsOn", "unknown_step"),
        ("body.steps.3.nodeId", "missing"),
        ("body.steps.3.command", "unknown_command"),
    ]


def test_new_execution_resolves_names_drops_repeats_and_applies_defaults() -> None:
    ex = build(ctrl("a"), ctrl("b", "a", 0, "a"), ctrl("c", 1, maxRetries=0, optional=True),
               timeout=120, max_retries=5)
    assert [s.dependsOn for s in ex.steps] == [[], [0], [1]]
    assert [s.maxRetries for s in ex.steps] == [5, 5, 0]
    assert [s.index for s in ex.steps] == [0, 1, 2]
    assert ex.steps[2].optional
    assert ex.status == ExecutionStatus.pending and ex.progress == 0
    assert statuses(ex) == [StepStatus.pending] * 3
    assert ex.timeoutAt == at(120) and ex.createdAt == ex.updatedAt == T0
    assert ex.startedAt is None and ex.finishedAt is None


# --- running ---------------------------------------------------------------------------


def test_a_linear_chain_runs_in_order() -> None:
    run = Driver(build(ctrl("a"), ctrl("b", "a"), ctrl("c", "b")))
    d = run(Tick(), 0)
    assert d.dispatch == [Dispatch(0, 1)] and d.changed and not d.finished
    assert statuses(run.ex) == [StepStatus.running, StepStatus.pending, StepStatus.pending]
    assert run.ex.status == ExecutionStatus.running and run.ex.startedAt == T0
    assert run(Tick(), 1).dispatch == []
    d = run(StepSucceeded(0, 1, {"n": 1}), 2)
    assert d.dispatch == [Dispatch(1, 1)] and run.ex.progress == 33
    d = run(StepSucceeded(1, 1, {"n": 2}), 3)
    assert d.dispatch == [Dispatch(2, 1)] and run.ex.progress == 66
    d = run(StepSucceeded(2, 1, {"n": 3}), 4)
    assert d.dispatch == [] and d.finished and d.wake_at is None
    assert run.ex.status == ExecutionStatus.completed and run.ex.progress == 100
    assert run.ex.finishedAt == at(4) and run.ex.updatedAt == at(4) and run.ex.error is None
    assert [s.result for s in run.ex.steps] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [s.startedAt for s in run.ex.steps] == [at(0), at(2), at(3)]


def test_independent_steps_dispatch_together() -> None:
    run = Driver(build(ctrl("a"), ctrl("b"), ctrl("c", "a", "b"), ctrl("d")))
    assert run(Tick(), 0).dispatch == [Dispatch(0, 1), Dispatch(1, 1), Dispatch(3, 1)]
    assert run(StepSucceeded(0, 1), 1).dispatch == []  # c still waits for b
    assert run(StepSucceeded(1, 1), 2).dispatch == [Dispatch(2, 1)]
    run(StepSucceeded(3, 1), 3)
    assert run(StepSucceeded(2, 1), 4).finished


def test_any_event_starts_ready_steps() -> None:
    """A result is not needed to start: the first event of any kind dispatches."""
    run = Driver(build(ctrl("a")))
    assert run(StepSucceeded(0, 1), 0).dispatch == [Dispatch(0, 1)]  # stale for now, then started


@pytest.mark.parametrize(("backoff", "expected"), [
    (Backoff(), [1, 2, 4, 8, 16, 32, 60, 60]),
    (Backoff(initialSeconds=0.5, factor=3, maxSeconds=10), [0.5, 1.5, 4.5, 10, 10]),
    (Backoff(initialSeconds=5, factor=1, maxSeconds=60), [5, 5, 5]),
    (Backoff(initialSeconds=7, factor=2, maxSeconds=0), [0, 0]),
])
def test_backoff_delays(backoff: Backoff, expected: list[float]) -> None:
    assert [backoff.delay(n) for n in range(len(expected))] == pytest.approx(expected)


def test_backoff_does_not_overflow() -> None:
    assert Backoff(initialSeconds=3600, factor=10, maxSeconds=86400).delay(10_000) == 86400


def test_retries_wait_for_their_backoff() -> None:
    backoff = Backoff(initialSeconds=2, factor=3, maxSeconds=10)
    run = Driver(build(ctrl("a", maxRetries=3, backoff=backoff, timeoutSeconds=1000)))
    run(Tick(), 0)
    now = 0.0
    for attempt, delay in enumerate([2, 6, 10], start=1):  # 2*3**0, 2*3**1, min(10, 2*3**2)
        d = run(StepFailed(0, attempt, BOOM), now)
        step = run.ex.steps[0]
        assert step.status == StepStatus.retrying and step.error == BOOM
        assert step.nextAttemptAt == at(now + delay) and d.wake_at == at(now + delay)
        assert d.dispatch == [] and run.ex.status == ExecutionStatus.running
        early = run(Tick(), now + delay - 0.001)
        assert early.dispatch == [] and not early.changed
        now += delay
        assert run(Tick(), now).dispatch == [Dispatch(0, attempt + 1)]
        assert run.ex.steps[0].attempts == attempt + 1 and run.ex.steps[0].startedAt == T0
    d = run(StepFailed(0, 4, BOOM), now)  # retries are used up
    assert d.finished and run.ex.steps[0].status == StepStatus.failed
    assert run.ex.status == ExecutionStatus.failed and run.ex.error is not None
    assert run.ex.error.code == "step_failed" and "'a' failed: it broke" in run.ex.error.message


def test_a_step_that_fails_twice_then_succeeds_completes_the_execution() -> None:
    run = Driver(build(ctrl("a", maxRetries=2, backoff=Backoff(initialSeconds=1, factor=2)),
                       ctrl("b", "a", maxRetries=0)))
    run(Tick(), 0)
    run(StepFailed(0, 1, BOOM), 1)
    run(Tick(), 2)
    run(StepFailed(0, 2, BOOM), 3)
    assert run.ex.steps[0].nextAttemptAt == at(5)
    assert run(Tick(), 5).dispatch == [Dispatch(0, 3)]
    assert run(StepSucceeded(0, 3, {"ok": True}), 6).dispatch == [Dispatch(1, 1)]
    step = run.ex.steps[0]
    assert step.status == StepStatus.succeeded and step.result == {"ok": True} and step.error is None
    assert run(StepSucceeded(1, 1), 7).finished
    assert run.ex.status == ExecutionStatus.completed


def test_a_non_retryable_error_fails_at_once() -> None:
    run = Driver(build(ctrl("a", maxRetries=5)))
    run(Tick(), 0)
    d = run(StepFailed(0, 1, FATAL), 1)
    assert d.finished and d.dispatch == [] and d.wake_at is None
    assert run.ex.steps[0].status == StepStatus.failed and run.ex.steps[0].error == FATAL
    assert run.ex.status == ExecutionStatus.failed and run.ex.finishedAt == at(1)


def test_max_retries_zero_fails_on_the_first_retryable_error() -> None:
    run = Driver(build(ctrl("a"), max_retries=0))
    run(Tick(), 0)
    assert run(StepFailed(0, 1, BOOM), 1).finished
    assert run.ex.steps[0].status == StepStatus.failed and run.ex.steps[0].attempts == 1


def test_an_attempt_that_times_out_is_aborted_and_retried() -> None:
    run = Driver(build(ctrl("a", timeoutSeconds=30, maxRetries=1,
                            backoff=Backoff(initialSeconds=5))))
    assert run(Tick(), 0).wake_at == at(30)
    run.ex.steps[0].commandId = "cmd-1"  # the orchestrator records what it sent
    assert not run(Tick(), 29.999).changed
    d = run(Tick(), 30)
    assert d.abort == [Abort(0, 1, "cmd-1")] and d.dispatch == []
    step = run.ex.steps[0]
    assert step.status == StepStatus.retrying and step.error is not None
    assert step.error.code == "timeout" and step.error.retryable
    assert step.nextAttemptAt == at(35) and d.wake_at == at(35)
    assert not run(StepSucceeded(0, 1), 31).changed  # the late result of the aborted attempt
    d = run(Tick(), 35)
    assert d.dispatch == [Dispatch(0, 2)] and run.ex.steps[0].commandId is None
    assert run.ex.steps[0].attemptTimeoutAt == at(65)
    d = run(Tick(), 65)  # the last attempt times out too
    assert d.abort == [Abort(0, 2, None)] and d.finished
    assert run.ex.steps[0].status == StepStatus.failed
    assert run.ex.status == ExecutionStatus.failed


def test_the_execution_deadline_stops_everything() -> None:
    run = Driver(build(ctrl("a", timeoutSeconds=500), ctrl("b", "a"), ctrl("c", timeoutSeconds=5),
                       ctrl("d"), timeout=100))
    run(Tick(), 0)
    run(StepSucceeded(3, 1), 1)
    run(StepFailed(2, 1, BOOM), 2)
    assert statuses(run.ex) == [StepStatus.running, StepStatus.pending, StepStatus.retrying,
                                StepStatus.succeeded]
    d = run(Tick(), 100)
    assert d.finished and d.dispatch == [] and d.abort == [Abort(0, 1, None)]
    assert statuses(run.ex) == [StepStatus.cancelled, StepStatus.skipped, StepStatus.skipped,
                                StepStatus.succeeded]
    assert run.ex.status == ExecutionStatus.failed and run.ex.abort == "deadline"
    assert run.ex.error is not None and run.ex.error.code == "deadline_exceeded"
    assert {s.error.code for s in run.ex.steps[:3] if s.error} == {"deadline"}
    assert run.ex.progress == 25 and d.wake_at is None


def test_cancel_aborts_running_steps_and_cancels_the_rest() -> None:
    run = Driver(build(ctrl("a"), ctrl("b"), ctrl("c"), ctrl("d", "a")))
    run(Tick(), 0)
    run(StepSucceeded(0, 1, {"kept": 1}), 1)  # d starts
    run(StepFailed(2, 1, BOOM), 2)  # c waits for its retry
    d = run(Cancel("operator said so"), 3)
    assert d.finished and d.dispatch == []
    assert d.abort == [Abort(1, 1, None), Abort(3, 1, None)]
    assert statuses(run.ex) == [StepStatus.succeeded, StepStatus.cancelled, StepStatus.cancelled,
                                StepStatus.cancelled]
    assert run.ex.steps[0].result == {"kept": 1}
    assert run.ex.status == ExecutionStatus.cancelled and run.ex.abort == "cancelled"
    assert run.ex.error == StepError(code="cancelled", message="operator said so", retryable=True)


def test_cancel_before_anything_started() -> None:
    run = Driver(build(ctrl("a"), ctrl("b", "a")))
    d = run(Cancel(), 0)
    assert d.finished and d.abort == [] and d.dispatch == []
    assert statuses(run.ex) == [StepStatus.cancelled] * 2
    assert run.ex.status == ExecutionStatus.cancelled and run.ex.startedAt is None


def test_an_optional_failure_skips_its_dependents_but_does_not_fail_the_execution() -> None:
    run = Driver(build(ctrl("opt", optional=True, maxRetries=0), ctrl("needs_opt", "opt"),
                       ctrl("after", "needs_opt"), ctrl("other")))
    run(Tick(), 0)
    d = run(StepFailed(0, 1, BOOM), 1)
    assert not d.finished and d.abort == [] and d.dispatch == []
    assert statuses(run.ex) == [StepStatus.failed, StepStatus.skipped, StepStatus.skipped,
                                StepStatus.running]
    assert run.ex.steps[1].error is not None and run.ex.steps[1].error.code == "dependency_failed"
    assert run.ex.steps[2].error is not None and "needs_opt" in run.ex.steps[2].error.message
    assert run.ex.progress == 75  # the optional failure and both skips are settled
    d = run(StepSucceeded(3, 1), 2)
    assert d.finished and run.ex.status == ExecutionStatus.completed and run.ex.error is None
    assert run.ex.progress == 100


def test_a_required_failure_fails_fast() -> None:
    run = Driver(build(ctrl("a", maxRetries=0), ctrl("b"), ctrl("c"), ctrl("d", "a"), ctrl("e", "b")))
    run(Tick(), 0)
    run(StepSucceeded(1, 1), 1)  # e starts
    d = run(StepFailed(0, 1, BOOM), 2)
    assert d.finished and d.dispatch == []
    assert d.abort == [Abort(2, 1, None), Abort(4, 1, None)]
    assert statuses(run.ex) == [StepStatus.failed, StepStatus.succeeded, StepStatus.cancelled,
                                StepStatus.skipped, StepStatus.cancelled]
    assert run.ex.status == ExecutionStatus.failed
    assert run.ex.error is not None and run.ex.error.code == "step_failed"
    assert "'a'" in run.ex.error.message
    assert {s.error.code for s in run.ex.steps[2:] if s.error} == {"execution_failed"}


@pytest.mark.parametrize("event", [
    pytest.param(StepSucceeded(0, 1), id="success_of_an_old_attempt"),
    pytest.param(StepFailed(0, 1, BOOM), id="failure_of_an_old_attempt"),
    pytest.param(StepSucceeded(0, 3), id="success_of_a_future_attempt"),
    pytest.param(StepSucceeded(1, 1), id="success_of_a_step_not_started"),
    pytest.param(StepFailed(7, 1, BOOM), id="unknown_index"),
    pytest.param(StepSucceeded(-1, 1), id="negative_index"),
])
def test_a_stale_result_changes_nothing(event: Event) -> None:
    run = Driver(build(ctrl("a", backoff=Backoff(initialSeconds=1)), ctrl("b", "a")))
    run(Tick(), 0)
    run(StepFailed(0, 1, BOOM), 1)
    run(Tick(), 2)  # attempt 2 runs
    before = run.ex.model_dump()
    d = run(event, 3)
    assert not d.changed and d.dispatch == [] and d.abort == [] and not d.finished
    assert d.execution.model_dump() == before


@pytest.mark.parametrize("repeat", [StepSucceeded(0, 1, {"x": 2}), StepFailed(0, 1, FATAL)],
                         ids=["success", "failure"])
def test_a_repeated_result_changes_nothing(repeat: Event) -> None:
    run = Driver(build(ctrl("a"), ctrl("b", "a")))
    run(Tick(), 0)
    assert run(StepSucceeded(0, 1, {"x": 1}), 1).changed
    d = run(repeat, 1)
    assert not d.changed and d.dispatch == [] and run.ex.steps[0].result == {"x": 1}


@pytest.mark.parametrize("event", [Tick(), StepSucceeded(0, 1), StepFailed(0, 1, FATAL), Cancel()],
                         ids=["tick", "success", "failure", "cancel"])
@pytest.mark.parametrize("ending", ["completed", "failed", "cancelled"])
def test_events_after_the_end_change_nothing(event: Event, ending: str) -> None:
    run = Driver(build(ctrl("a", maxRetries=0), timeout=10))
    run(Tick(), 0)
    if ending == "completed":
        run(StepSucceeded(0, 1), 1)
    elif ending == "failed":
        run(StepFailed(0, 1, BOOM), 1)
    else:
        run(Cancel(), 1)
    assert run.ex.status == ExecutionStatus(ending)
    before = run.ex.model_dump()
    d = run(event, 1000)  # long past every deadline
    assert not d.changed and not d.finished and d.dispatch == [] and d.abort == []
    assert d.wake_at is None and run.ex.model_dump() == before


# --- retry of a whole execution --------------------------------------------------------


def test_retry_reruns_only_what_did_not_succeed() -> None:
    run = Driver(build(ctrl("a"), ctrl("b", "a", maxRetries=0), ctrl("c", "b"), ctrl("d"),
                       timeout=60))
    run(Tick(), 0)
    run(StepSucceeded(0, 1, {"a": 1}), 1)
    run(StepSucceeded(3, 1, {"d": 1}), 1)
    assert run(StepFailed(1, 1, BOOM), 2).finished
    assert statuses(run.ex) == [StepStatus.succeeded, StepStatus.failed, StepStatus.skipped,
                                StepStatus.succeeded]
    assert run.ex.progress == 50
    d = run(Retry(), 500)
    assert d.dispatch == [Dispatch(1, 1)] and d.changed and not d.finished
    assert statuses(run.ex) == [StepStatus.succeeded, StepStatus.running, StepStatus.pending,
                                StepStatus.succeeded]
    assert [run.ex.steps[i].result for i in (0, 3)] == [{"a": 1}, {"d": 1}]
    assert run.ex.steps[0].attempts == 1 and run.ex.steps[0].finishedAt == at(1)
    b = run.ex.steps[1]
    assert b.error is None and b.attempts == 1 and b.startedAt == at(500) and b.finishedAt is None
    assert run.ex.retryCount == 1 and run.ex.timeoutAt == at(560) and run.ex.finishedAt is None
    assert run.ex.status == ExecutionStatus.running and run.ex.error is None
    assert run.ex.progress == 50
    assert run(StepSucceeded(1, 1), 501).dispatch == [Dispatch(2, 1)]
    assert run(StepSucceeded(2, 1), 502).finished
    assert run.ex.status == ExecutionStatus.completed and run.ex.finishedAt == at(502)


def test_retry_after_cancel_reruns_the_cancelled_steps() -> None:
    run = Driver(build(ctrl("a"), ctrl("b", "a"), ctrl("c")))
    run(Tick(), 0)
    run(StepSucceeded(2, 1), 1)
    run(Cancel(), 2)
    d = run(Retry(), 3)
    assert d.dispatch == [Dispatch(0, 1)]
    assert statuses(run.ex) == [StepStatus.running, StepStatus.pending, StepStatus.succeeded]
    assert run.ex.abort is None and run.ex.error is None and run.ex.retryCount == 1


def test_retry_after_a_deadline_gets_a_new_deadline() -> None:
    run = Driver(build(ctrl("a"), timeout=10))
    run(Tick(), 0)
    assert run(Tick(), 10).finished
    d = run(Retry(), 50)
    assert d.dispatch == [Dispatch(0, 1)] and d.wake_at == at(60)
    assert run.ex.timeoutAt == at(60) and run.ex.abort is None


def test_retry_keeps_optional_failures_and_what_they_skipped() -> None:
    run = Driver(build(ctrl("opt", optional=True, maxRetries=0), ctrl("s", "opt"),
                       ctrl("req", maxRetries=0)))
    run(Tick(), 0)
    run(StepFailed(0, 1, BOOM), 1)
    assert run(StepFailed(2, 1, BOOM), 2).finished
    assert run.ex.progress == 66
    d = run(Retry(), 3)
    assert d.dispatch == [Dispatch(2, 1)]
    assert statuses(run.ex) == [StepStatus.failed, StepStatus.skipped, StepStatus.running]
    assert run.ex.progress == 66
    assert run(StepSucceeded(2, 1), 4).finished
    assert run.ex.status == ExecutionStatus.completed


@pytest.mark.parametrize("state", ["pending", "running", "completed"])
def test_retry_is_rejected_unless_failed_or_cancelled(state: str) -> None:
    run = Driver(build(ctrl("a")))
    if state != "pending":
        run(Tick(), 0)
    if state == "completed":
        run(StepSucceeded(0, 1), 1)
    assert run.ex.status == ExecutionStatus(state)
    before = run.ex.model_dump()
    with pytest.raises(Rejected, match=f"this one is {state}"):
        decide(run.ex, Retry(), at(2))
    assert run.ex.model_dump() == before


def test_a_result_at_the_deadline_that_finishes_the_work_completes_it() -> None:
    run = Driver(build(ctrl("a"), timeout=10))
    run(Tick(), 0)
    d = run(StepSucceeded(0, 1), 10)
    assert d.finished and run.ex.status == ExecutionStatus.completed and run.ex.abort is None
    assert run.ex.finishedAt == at(10)


def test_a_retry_that_settles_at_once_reports_finished() -> None:
    # The deadline and the optional step's timeout land on the same Tick: 's' is skipped
    # for the deadline, not for its optional dependency, so Retry resets it and the same
    # decision skips it again for 'opt', which completes the execution.
    run = Driver(build(ctrl("opt", optional=True, maxRetries=0, timeoutSeconds=10),
                       ctrl("s", "opt"), timeout=10))
    run(Tick(), 0)
    assert run(Tick(), 10).finished
    assert run.ex.status == ExecutionStatus.failed and run.ex.abort == "deadline"
    d = run(Retry(), 11)
    assert d.dispatch == [] and run.ex.status == ExecutionStatus.completed
    assert d.finished and run.ex.finishedAt == at(11)


# --- progress, wake_at, record ---------------------------------------------------------


def test_progress_counts_settled_steps() -> None:
    run = Driver(build(ctrl("a"), ctrl("b"), ctrl("c", optional=True, maxRetries=0), ctrl("d"),
                       ctrl("e"), ctrl("f"), ctrl("g")))
    seen = [run(Tick(), 0).execution.progress]
    seen.append(run(StepSucceeded(0, 1), 1).execution.progress)
    seen.append(run(StepFailed(1, 1, BOOM), 2).execution.progress)  # retrying: not settled
    seen.append(run(StepFailed(2, 1, BOOM), 3).execution.progress)  # optional failure: settled
    for i in (3, 4, 5):
        seen.append(run(StepSucceeded(i, 1), 4).execution.progress)
    seen.append(run(Tick(), 100).execution.progress)  # b's retry starts
    seen.append(run(StepSucceeded(1, 2), 101).execution.progress)
    seen.append(run(StepSucceeded(6, 1), 102).execution.progress)
    assert seen == [0, 14, 14, 28, 42, 57, 71, 71, 85, 100]


@pytest.mark.parametrize(("earliest", "expected"), [
    ("deadline", 50), ("attempt_timeout", 40), ("next_retry", 12)])
def test_wake_at_is_the_earliest_timer(earliest: str, expected: float) -> None:
    run = Driver(build(ctrl("a", timeoutSeconds=40 if earliest == "attempt_timeout" else 1000),
                       ctrl("b", backoff=Backoff(initialSeconds=10 if earliest == "next_retry" else 500)),
                       timeout=50 if earliest == "deadline" else 5000))
    run(Tick(), 0)
    d = run(StepFailed(1, 1, BOOM), 2)
    assert d.wake_at == at(expected)
    assert not run(Tick(), expected - 0.5).changed
    assert run(Tick(), expected).changed


def test_record_keeps_the_latest_messages() -> None:
    ex = build(ctrl("a"))
    step = ex.steps[0]
    step.attempts = 2
    for n in range(7):
        record(step, "out", "command", at=at(n), limit=3, n=n)
    assert [m["n"] for m in step.messages] == [4, 5, 6]
    assert step.messages[-1] == {"at": at(6), "direction": "out", "type": "command", "attempt": 2,
                                 "n": 6}
    record(step, "in", "result", at=at(7))
    assert len(step.messages) == 4  # the default limit is 200
    for n in range(300):
        record(step, "in", "result", at=at(n))
    assert len(step.messages) == 200 and step.messages[-1]["at"] == at(299)

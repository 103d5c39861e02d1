"""The execution state machine under random step graphs and random event orders.

Each example builds an acyclic graph (step i depends only on steps before it), drives
it with a random mix of results, stale and repeated results, clock ticks, cancels and
retries, then with a fair policy (only successes and ticks) until it ends. Every
decision is checked against the rules in :mod:`aiwm.execution.machine`. Pure: the
clock is a number of seconds advanced by hand.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiwm.execution import (
    Backoff,
    Cancel,
    Decision,
    Event,
    Execution,
    ExecutionIn,
    ExecutionStatus,
    Rejected,
    Retry,
    Step,
    StepError,
    StepFailed,
    StepIn,
    StepStatus,
    StepSucceeded,
    Tick,
    decide,
    new_execution,
)

T0 = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTIONS = ["succeed", "succeed", "fail", "fail", "stale", "tick", "tick_to_wake", "cancel", "retry"]


@st.composite
def executions(draw: st.DrawFn) -> Execution:
    n = draw(st.integers(1, 8), label="steps")
    steps = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=i)) if i else []
        by_name = draw(st.booleans())
        steps.append(StepIn(
            name=f"s{i}", kind="controller", command="wait",
            dependsOn=[f"s{d}" if by_name else d for d in deps],
            optional=draw(st.booleans()),
            maxRetries=draw(st.integers(0, 2)),
            backoff=Backoff(initialSeconds=draw(st.sampled_from([0, 0.5, 1, 5, 20])),
                            factor=draw(st.sampled_from([1, 1.5, 2, 3])),
                            maxSeconds=draw(st.sampled_from([0, 2, 10, 60]))),
            timeoutSeconds=draw(st.sampled_from([0.5, 1, 5, 20, 60])),
        ))
    timeout = draw(st.sampled_from([5, 20, 60, 300, 3600]))
    return new_execution(ExecutionIn(name="prop", steps=steps, timeoutSeconds=timeout),
                         execution_id="ex-1", org_id="org-1", created_by="user-1", now=T0,
                         default_max_retries=1, controller_actions=None)


def blocked_only_by_optional(ex: Execution, step: Step) -> bool:
    """Every dependency that did not succeed is an optional step that failed, or a step
    skipped (in turn) only for that reason."""
    blockers = [ex.steps[d] for d in step.dependsOn if ex.steps[d].status != StepStatus.succeeded]
    return bool(blockers) and all(
        (b.status == StepStatus.failed and b.optional)
        or (b.status == StepStatus.skipped and blocked_only_by_optional(ex, b)) for b in blockers)


def settled(ex: Execution, step: Step) -> bool:
    """The step's outcome lets the execution complete."""
    return (step.status == StepStatus.succeeded
            or (step.status == StepStatus.failed and step.optional)
            or (step.status == StepStatus.skipped and blocked_only_by_optional(ex, step)))


def running(ex: Execution) -> list[Step]:
    return [s for s in ex.steps if s.status == StepStatus.running]


def timers(ex: Execution) -> list[dt.datetime]:
    out = [ex.timeoutAt]
    for s in ex.steps:
        if s.status == StepStatus.running and s.attemptTimeoutAt is not None:
            out.append(s.attemptTimeoutAt)
        if s.status == StepStatus.retrying and s.nextAttemptAt is not None:
            out.append(s.nextAttemptAt)
    return out


def check(before: Execution, event: Event, now: dt.datetime, d: Decision, *,
          settled_by_retry: bool = False) -> None:
    """Every rule a single decision must keep (``settled_by_retry``: a Retry made the
    execution terminal at once, which must count as finishing)."""
    ex = d.execution
    # (a) a step is dispatched only once every step it depends on has succeeded
    assert len({x.index for x in d.dispatch}) == len(d.dispatch)
    for x in d.dispatch:
        step = ex.steps[x.index]
        assert step.status == StepStatus.running and step.attempts == x.attempt
        assert step.attemptTimeoutAt == now + dt.timedelta(seconds=step.timeoutSeconds)
        assert all(ex.steps[dep].status == StepStatus.succeeded for dep in step.dependsOn)
        was = before.steps[x.index]
        if was.status == StepStatus.retrying:  # a retry starts only once its backoff is over
            assert was.nextAttemptAt is not None and now >= was.nextAttemptAt
    # no step runs more than 1 + maxRetries attempts; a new retry waits its backoff
    for step in ex.steps:
        assert step.attempts <= step.maxRetries + 1
        if step.status == StepStatus.retrying and before.steps[step.index].status != StepStatus.retrying:
            assert step.nextAttemptAt == now + dt.timedelta(seconds=step.backoff.delay(step.attempts - 1))
    # only attempts that were running are aborted, each once
    assert len({x.index for x in d.abort}) == len(d.abort)
    for x in d.abort:
        old = before.steps[x.index]
        assert old.status == StepStatus.running and old.attempts == x.attempt
        assert x.command_id == old.commandId
        assert ex.steps[x.index].status != StepStatus.running or ex.steps[x.index].attempts > x.attempt
    # (c) progress never goes down, not even on Retry
    assert 0 <= before.progress <= ex.progress <= 100
    # (d) an execution ends with every step done and nothing running
    if ex.terminal:
        assert all(s.done for s in ex.steps)
        assert not running(ex)
        assert d.wake_at is None and d.dispatch == []
        assert ex.finishedAt is not None
        # (e) how it ended follows from its steps and from why it stopped
        everything_settled = all(settled(ex, s) for s in ex.steps)
        assert (ex.status == ExecutionStatus.completed) == (ex.abort is None and everything_settled)
        if ex.status == ExecutionStatus.completed:
            assert ex.progress == 100 and ex.error is None
            assert all(s.status == StepStatus.succeeded or blocked_only_by_optional(ex, s)
                       for s in ex.steps if not s.optional)
        elif ex.abort == "cancelled":
            assert ex.status == ExecutionStatus.cancelled
        else:
            assert ex.status == ExecutionStatus.failed and ex.error is not None
            assert ex.abort == "deadline" or any(
                s.status == StepStatus.failed and not s.optional for s in ex.steps)
    else:
        # the next moment a Tick can change something; nothing is overdue now
        assert d.wake_at == min(timers(ex)) and d.wake_at > now
        assert ex.abort is None and ex.finishedAt is None
        assert ex.status == (ExecutionStatus.running if any(s.attempts for s in ex.steps)
                             else ExecutionStatus.pending)
    if isinstance(event, Retry):
        assert d.finished == ex.terminal
    else:
        assert d.finished == (ex.terminal and not before.terminal)
        if before.terminal:  # events after the end change nothing
            assert not d.changed and ex.model_dump() == before.model_dump()
    if d.finished:
        assert ex.finishedAt == now
    assert d.changed == (ex.model_dump(exclude={"updatedAt"}) != before.model_dump(exclude={"updatedAt"}))
    assert ex.updatedAt == (now if d.changed else before.updatedAt)


class Run:
    """One execution driven by hand, checking every decision."""

    def __init__(self, ex: Execution) -> None:
        self.ex = ex
        self.now = T0
        self.results: list[StepSucceeded | StepFailed] = []
        self.events = 0
        self.settled_by_retry = False

    def send(self, event: Event) -> Decision:
        before = self.ex
        snapshot = before.model_dump()
        d = decide(before, event, self.now)
        assert before.model_dump() == snapshot  # the input is never modified
        if isinstance(event, Retry):
            self.settled_by_retry = d.execution.terminal
        check(before, event, self.now, d, settled_by_retry=self.settled_by_retry)
        self.ex = d.execution
        self.events += 1
        # a decision leaves nothing due at its own moment: at the same now, a tick and
        # (f) the same result again change nothing
        assert not decide(self.ex, Tick(), self.now).changed
        if isinstance(event, StepSucceeded | StepFailed):
            self.results.append(event)
            again = decide(self.ex, event, self.now)
            assert not again.changed and again.dispatch == [] and again.abort == []
            assert not again.finished
        return d

    def retry(self) -> None:
        before = self.ex
        if before.status not in (ExecutionStatus.failed, ExecutionStatus.cancelled):
            with pytest.raises(Rejected):
                decide(before, Retry(), self.now)
            return
        d = self.send(Retry())
        ex = d.execution
        assert ex.retryCount == before.retryCount + 1
        assert ex.timeoutAt == self.now + dt.timedelta(seconds=ex.timeoutSeconds)
        for old in before.steps:
            new = ex.steps[old.index]
            if old.status == StepStatus.succeeded or (old.status == StepStatus.failed and old.optional):
                # what succeeded keeps its result and is not run again; an optional
                # failure stays settled
                assert new.model_dump() == old.model_dump()
                assert old.index not in {x.index for x in d.dispatch}
            elif old.status in (StepStatus.failed, StepStatus.cancelled):
                # run again from scratch: started now, or skipped again at once
                assert new.status in (StepStatus.pending, StepStatus.running, StepStatus.skipped)
                assert new.attempts == (1 if new.status == StepStatus.running else 0)
                assert new.result is None


def chaos(run: Run, data: st.DataObject) -> None:
    """One random event."""
    action = data.draw(st.sampled_from(ACTIONS))
    live = running(run.ex)
    if action in ("succeed", "fail") and live:
        step = data.draw(st.sampled_from(live))
        if action == "succeed":
            run.send(StepSucceeded(step.index, step.attempts, {"attempt": step.attempts}))
        else:
            retryable = data.draw(st.booleans())
            run.send(StepFailed(step.index, step.attempts,
                                StepError(code="err", message="random failure", retryable=retryable)))
    elif action == "stale" and run.results:
        old = data.draw(st.sampled_from(run.results))
        current = run.ex.steps[old.index]
        is_current = current.status == StepStatus.running and current.attempts == old.attempt
        d = run.send(old)
        if not is_current:  # a late or repeated result changes nothing
            assert not d.changed and d.dispatch == [] and d.abort == []
    elif action == "tick_to_wake" and not run.ex.terminal:
        wake = decide(run.ex, Tick(), run.now).wake_at
        assert wake is not None
        run.now = wake
        run.send(Tick())
    elif action == "cancel":
        run.send(Cancel())
    elif action == "retry":
        run.retry()
    else:
        run.now += dt.timedelta(seconds=data.draw(st.integers(0, 40)))
        run.send(Tick())


def finish_fairly(run: Run, data: st.DataObject) -> None:
    """(b) Only successes and ticks from here: the execution ends within a bound.

    Each success settles a step for good and each tick at ``wake_at`` with nothing
    running starts a retry (which then succeeds) or hits the deadline."""
    bound = 2 * len(run.ex.steps) + 2
    for _ in range(bound):
        if run.ex.terminal:
            break
        live = running(run.ex)
        if live:
            step = data.draw(st.sampled_from(live))
            run.send(StepSucceeded(step.index, step.attempts))
        else:
            wake = decide(run.ex, Tick(), run.now).wake_at
            assert wake is not None and wake > run.now
            run.now = wake
            run.send(Tick())
    assert run.ex.terminal, f"still {run.ex.status.value} after {bound} fair events"


@PROPERTIES
@given(ex=executions(), data=st.data())
def test_random_event_orders_keep_the_rules(ex: Execution, data: st.DataObject) -> None:
    run = Run(ex)
    for _ in range(data.draw(st.integers(0, 40), label="random events")):
        chaos(run, data)
    finish_fairly(run, data)
    if run.ex.status in (ExecutionStatus.failed, ExecutionStatus.cancelled):
        run.retry()  # and a retried execution ends too
        finish_fairly(run, data)


@PROPERTIES
@given(ex=executions(), data=st.data())
def test_only_successes_complete_every_graph(ex: Execution, data: st.DataObject) -> None:
    """With no failure at all, every step runs exactly once, after its dependencies, and
    the execution completes."""
    run = Run(ex)
    run.send(Tick())
    order: list[int] = []
    while running(run.ex):
        step = data.draw(st.sampled_from(running(run.ex)))
        assert all(d in order for d in step.dependsOn)
        order.append(step.index)
        run.send(StepSucceeded(step.index, step.attempts))
    assert sorted(order) == list(range(len(ex.steps)))
    assert run.ex.status == ExecutionStatus.completed and run.ex.progress == 100
    assert all(s.attempts == 1 for s in run.ex.steps)


@PROPERTIES
@given(ex=executions())
def test_time_alone_ends_every_execution(ex: Execution) -> None:
    """No result ever arrives: ticking at each wake_at, attempts time out, retries run
    out or the deadline hits, and the execution ends within a bound."""
    run = Run(ex)
    wake = run.send(Tick()).wake_at
    bound = 2 * sum(s.maxRetries + 1 for s in ex.steps) + 2  # a timeout and a restart per attempt
    for _ in range(bound):
        if wake is None:
            break
        run.now = wake
        wake = run.send(Tick()).wake_at
    assert run.ex.terminal
    assert all(s.status != StepStatus.succeeded and s.result is None for s in run.ex.steps)

"""aiwm.metrics: what an execution's transitions count (pure: a recording sink)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest

from aiwm.metrics import Metrics, record_execution

T0 = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)


class Sink(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, float, dict[str, str]]] = []

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self.calls.append(("inc", name, value, tags))

    def observe(self, name: str, value: float, **tags: str) -> None:
        self.calls.append(("observe", name, value, tags))


def step(status: str, seconds: float | None = None, command: str = "wait") -> Any:
    return SimpleNamespace(kind="controller", command=command, status=status,
                           startedAt=T0 if seconds is not None else None,
                           finishedAt=T0 + dt.timedelta(seconds=seconds) if seconds else None)


def execution(status: str, steps: list[Any], terminal: bool, seconds: float = 0) -> Any:
    return SimpleNamespace(status=status, steps=steps, terminal=terminal, startedAt=T0,
                           finishedAt=T0 + dt.timedelta(seconds=seconds) if terminal else None)


def test_a_step_that_ends_is_counted_once_with_its_duration() -> None:
    sink = Sink()
    before = execution("running", [step("running", 0), step("pending")], False)
    after = execution("running", [step("succeeded", 2.5), step("running", 0, "http.check")],
                      False)
    record_execution(before, after, sink)
    tags = {"kind": "controller", "command": "wait", "status": "succeeded"}
    assert sink.calls == [("inc", "aiwm_execution_steps_total", 1.0, tags),
                          ("observe", "aiwm_execution_step_seconds", 2.5, tags)]
    sink.calls.clear()
    record_execution(after, after, sink)  # nothing changed: nothing counted
    assert sink.calls == []


def test_an_execution_that_ends_is_counted_with_its_duration() -> None:
    sink = Sink()
    before = execution("running", [step("running", 0)], False)
    after = execution("failed", [step("failed", 1.0)], True, seconds=4.0)
    record_execution(before, after, sink)
    assert ("inc", "aiwm_executions_total", 1.0, {"status": "failed"}) in sink.calls
    assert ("observe", "aiwm_execution_seconds", 4.0, {"status": "failed"}) in sink.calls


def test_outside_ray_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in plain uvicorn
    m = Metrics()
    m.inc("aiwm_executions_total", status="completed")
    m.set("aiwm_nodes_connected", 1, shard="0")
    m.observe("aiwm_heartbeat_gap_seconds", 1.0)
    assert m._made == {}

"""AIWM's own metrics, through ``ray.util.metrics``.

They appear in the Ray dashboard's metrics view and on every Ray node's Prometheus
endpoint (``ray start --metrics-export-port``), with Ray's ``ray_`` prefix added to the
names below. HTTP latency is not measured again here: Ray Serve already exports it per
route (``ray_serve_http_request_latency_ms``, ``ray_serve_num_http_requests``,
``ray_serve_num_http_error_requests``).

Outside a Ray worker or driver (plain uvicorn, unit tests) every call is a no-op.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("aiwm.metrics")

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800]
GAPS = [0.5, 1, 2, 5, 10, 30, 60, 120, 300]

# name -> (kind, description, tag keys, histogram boundaries)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "aiwm_nodes_connected": ("gauge", "Nodes with a live, registered session, per NodeHost",
                             ("shard",), None),
    "aiwm_node_commands_in_flight": ("gauge", "Node commands sent or queued without a result, "
                                     "per NodeHost", ("shard",), None),
    "aiwm_heartbeat_gap_seconds": ("histogram", "Seconds between a node's consecutive "
                                   "heartbeats as the controller handled them", (), GAPS),
    "aiwm_node_events_total": ("counter", "Nodes going online or offline", ("event",), None),
    "aiwm_execution_steps_total": ("counter", "Execution steps that ended, by kind, command "
                                   "and status", ("kind", "command", "status"), None),
    "aiwm_execution_step_seconds": ("histogram", "Duration of execution steps that ended",
                                    ("kind", "command", "status"), SECONDS),
    "aiwm_executions_total": ("counter", "Executions that ended, by status", ("status",), None),
    "aiwm_execution_seconds": ("histogram", "Duration of executions that ended",
                               ("status",), SECONDS),
}


class Metrics:
    """The metric objects of this process, made on first use."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._off = False

    def _metric(self, name: str) -> Any:
        if self._off:
            return None
        found = self._made.get(name)
        if found is not None:
            return found
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return None
            kind, description, tags, bounds = DEFINITIONS[name]
            if kind == "gauge":
                found = metrics.Gauge(name, description, tag_keys=tags)
            elif kind == "counter":
                found = metrics.Counter(name, description, tag_keys=tags)
            else:
                found = metrics.Histogram(name, description, boundaries=bounds or SECONDS,
                                          tag_keys=tags)
        except Exception as e:  # noqa: BLE001 - metrics must never break the work they count
            log.warning("metrics are off in this process: %s: %s", type(e).__name__, e)
            self._off = True
            return None
        self._made[name] = found
        return found

    def set(self, name: str, value: float, **tags: str) -> None:
        metric = self._metric(name)
        if metric is not None:
            metric.set(value, tags=tags or None)

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        metric = self._metric(name)
        if metric is not None:
            metric.inc(value, tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        metric = self._metric(name)
        if metric is not None:
            metric.observe(value, tags=tags or None)


metrics = Metrics()


STEP_ENDS = frozenset({"succeeded", "failed", "skipped", "cancelled"})


def record_execution(before: Any, after: Any, sink: Metrics | None = None) -> None:
    """Count what changed from ``before`` to ``after`` (two states of one execution): the
    steps that ended and, if it ended, the execution itself."""
    sink = sink or metrics
    for old, new in zip(before.steps, after.steps, strict=False):
        status = getattr(new.status, "value", new.status)
        if status in STEP_ENDS and getattr(old.status, "value", old.status) != status:
            tags = {"kind": str(new.kind), "command": str(new.command), "status": status}
            sink.inc("aiwm_execution_steps_total", **tags)
            if new.startedAt is not None and new.finishedAt is not None:
                sink.observe("aiwm_execution_step_seconds",
                             (new.finishedAt - new.startedAt).total_seconds(), **tags)
    if after.terminal and not before.terminal:
        status = getattr(after.status, "value", after.status)
        sink.inc("aiwm_executions_total", status=status)
        if after.startedAt is not None and after.finishedAt is not None:
            sink.observe("aiwm_execution_seconds",
                         (after.finishedAt - after.startedAt).total_seconds(), status=status)

"""ExecutionOrchestrator: runs executions durably.

A plain class; ``actors/__init__.py`` makes it the detached actor ``orchestrator``. The
decisions are the pure state machine's (:mod:`aiwm.execution.machine`); this class
feeds it events, writes each new state to MongoDB *before* acting on it, then acts:
node steps go out through the node's NodeProxy, controller steps run here
(:mod:`actors.controller_actions`), and a timer is armed for the next deadline.

After a restart it reloads every unfinished execution and carries on: succeeded steps
are not run again; a node step that was running waits again for its command, which
has a deterministic id, so a resend is recognised as the same command on both ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from actors.controller_actions import ACTIONS, Action, ActionContext, Node, StepFailure
from aiwm.auth import Principal, Role
from aiwm.errors import (
    AiwmError,
    Cancelled,
    CommandTimeout,
    InvalidReference,
    InvalidState,
    Unavailable,
    ValidationFailed,
    VersionConflict,
    field_errors,
)
from aiwm.execution import (
    Abort,
    Cancel,
    Decision,
    Dispatch,
    Event,
    Execution,
    ExecutionIn,
    Rejected,
    Retry,
    StepError,
    StepFailed,
    StepProgress,
    StepSucceeded,
    Tick,
    decide,
    new_execution,
    record,
)
from aiwm.logs import bound, correlation
from aiwm.logs import current as current_correlation
from aiwm.metrics import record_execution
from aiwm.settings import Settings
from aiwm.store import Store, utcnow

log = logging.getLogger("aiwm.executions")
RESULT_POLL = 30.0  # s: one wait for a result; the step's own timeout bounds the total
PROGRESS_POLL = 2.0  # s: the same, for commands whose progress the step shows meanwhile
SHOWS_PROGRESS = frozenset({"model.download"})  # node commands that report progress
LEFTOVER_SWEEP = 3600.0  # s between sweeps of abandoned import and upload staging folders
DELETE_GRACE = 600.0  # s a hidden version is left to the delete that hid it
# Node errors that another attempt cannot fix.
PERMANENT = frozenset({"unsupported_command", "invalid_spec", "image_not_found", "not_found",
                       "model_missing", "insufficient_storage", "validation_failed",
                       "invalid_step", "unauthorized", "forbidden"})


def new_execution_id() -> str:
    return f"exe-{uuid.uuid4().hex[:16]}"


def command_id(execution_id: str, index: int, attempt: int, run: int = 0) -> str:
    """The node command of one step attempt: the same after a restart, new per attempt
    and per retry of the execution (``run``: its retryCount; attempts start over)."""
    return f"{execution_id}_{index}_{attempt}" + (f"_r{run}" if run else "")


class ExecutionOrchestrator:
    def __init__(
        self,
        *,
        settings: Settings,
        node: Callable[[str, str], Node] | None = None,
        actions: dict[str, Action] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        id_factory: Callable[[], str] = new_execution_id,
        store: Store | None = None,
        autostart: bool = False,
    ) -> None:
        self._settings = settings
        self._node = node or _node_client(settings)
        self._actions = ACTIONS if actions is None else actions
        self._clock = clock
        self._new_id = id_factory
        self._store = store
        self._objects: Any = None
        self._live: dict[str, Execution] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._finished: dict[str, asyncio.Event] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        if autostart:  # as an actor, (re)started by Ray: resume without waiting for a call
            asyncio.get_running_loop().create_task(self._autostart())

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.for_settings(self._settings, clock=self._clock)
        return self._store

    @property
    def objects(self) -> Any:
        """The object store of model files (created at first use)."""
        if self._objects is None:
            from aiwm.objectstore import object_store_for

            self._objects = object_store_for(self._settings,
                                             public_url=self._settings.public_url())
        return self._objects

    async def ping(self) -> str:
        return "ok"

    async def start(self) -> dict[str, int]:
        """Reload unfinished executions and start the timeout monitor (idempotent)."""
        async with self._start_lock:
            if not self._started:
                await self.objects.ensure_ready()  # the bucket exists before any import
                docs = await self.store.executions.unfinished()
                self._started = True
                for doc in docs:
                    await self._resume(Execution.model_validate(doc))
                log.info("orchestrator started: %d unfinished executions resumed", len(docs))
                # What lives now lives as long as the actor: keep it out of the cyclic GC's
                # full collections, whose pauses otherwise land in the step latency tail.
                gc.freeze()
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch_timeouts())
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_leftovers())
        return {"live": len(self._live), "running": len(self._tasks)}

    async def _autostart(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.start()
                return
            except AiwmError as e:
                log.warning("orchestrator cannot start yet (%s); retrying", e.detail)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # --- the API's calls ------------------------------------------------------------------

    async def create(self, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        principal.require(Role.operator)
        await self.start()
        try:
            spec = ExecutionIn.model_validate(body)
        except ValidationError as e:
            raise ValidationFailed("invalid execution",
                                   extra={"errors": field_errors(e.errors())}) from None
        ex = new_execution(spec, execution_id=self._new_id(), org_id=principal.org_id,
                           created_by=principal.sub, now=self._clock(),
                           default_max_retries=self._settings.execution_max_retries,
                           controller_actions=frozenset(self._actions))
        await self._check_nodes(ex)
        return await self._begin(ex)

    async def cancel(self, principal: Principal, execution_id: str,
                     reason: str = "cancelled by request") -> dict[str, Any]:
        principal.require(Role.operator)
        await self._own(principal, execution_id)
        log.info("cancel of execution %s requested by %s: %s", execution_id, principal.sub,
                 reason, extra={"executionId": execution_id})
        d = await self._apply(execution_id, Cancel(reason), patient=False)
        return _out(d.execution)

    async def retry(self, principal: Principal, execution_id: str) -> dict[str, Any]:
        principal.require(Role.operator)
        await self._own(principal, execution_id)
        log.info("retry of execution %s requested by %s", execution_id, principal.sub,
                 extra={"executionId": execution_id})
        d = await self._apply(execution_id, Retry(), patient=False)
        return _out(d.execution)

    async def update(self, principal: Principal, execution_id: str,
                     changes: dict[str, Any]) -> dict[str, Any]:
        """Change what describes an execution (name, description, metadata), never its steps."""
        principal.require(Role.operator)
        await self._own(principal, execution_id)
        async with self._lock(execution_id):
            ex = await self._load(execution_id)
            new = ex.model_copy(deep=True, update={k: v for k, v in changes.items()
                                                   if k in ("name", "description", "metadata")})
            new.version, new.updatedAt = ex.version + 1, self._clock()
            await self.store.executions.save(_doc(new))
            if not new.terminal:
                self._live[execution_id] = new
            return _out(new)

    async def wait(self, org_id: str, execution_id: str, timeout: float) -> dict[str, Any]:
        """The execution once it has finished, or as it is after ``timeout`` seconds."""
        done = self._finished.setdefault(execution_id, asyncio.Event())
        try:
            doc = await self.store.executions.get(org_id, execution_id)
            if doc["status"] in ("pending", "running"):
                try:
                    await asyncio.wait_for(done.wait(), timeout)
                except TimeoutError:
                    pass
                doc = await self.store.executions.get(org_id, execution_id)
        finally:
            if done.is_set() or doc_terminal(self._live, execution_id):
                self._finished.pop(execution_id, None)
        return _jsonable(doc)

    async def census(self) -> dict[str, int]:
        return {"live": len(self._live), "running": len(self._tasks), "timers": len(self._timers)}

    # --- deployments ------------------------------------------------------------------------

    async def run_for_deployment(self, principal: Principal, deployment_id: str,
                                 purpose: str, version: int | None = None) -> dict[str, Any]:
        """Start the deploy/stop/restart/delete execution of a deployment; one in flight
        for the same deployment is cancelled first (the newest request wins). A deploy
        takes the model's latest version, or ``version`` (going back to one, say)."""
        from actors.deployment_flows import plan_for

        principal.require(Role.operator)
        await self.start()
        deployments = self.store.documents("deployments")
        dep = await deployments.get(principal.org_id, deployment_id)
        previous = dep.get("executionId")
        spec = await plan_for(self.store, principal.org_id, dep, purpose, objects=self.objects,
                              url_ttl=self._settings.aiwm_download_url_ttl, version=version)
        ex = new_execution(spec, execution_id=self._new_id(), org_id=principal.org_id,
                           created_by=principal.sub, now=self._clock(),
                           default_max_retries=self._settings.execution_max_retries,
                           controller_actions=frozenset(self._actions))
        await deployments.set_state(principal.org_id, deployment_id, {"executionId": ex.id})
        if previous and previous in self._live:
            await self._apply(previous, Cancel(f"superseded by {purpose} ({ex.id})"), patient=False)
        return await self._begin(ex)

    # --- the engine ---------------------------------------------------------------------------

    async def _begin(self, ex: Execution) -> dict[str, Any]:
        ex.correlationId = current_correlation() or ex.id  # its logs carry this id
        await self.store.executions.insert(_doc(ex))
        with bound(ex.correlationId):
            log.info("execution %s created: %s (%d steps)", ex.id, ex.name, len(ex.steps),
                     extra={"executionId": ex.id})
        self._live[ex.id] = ex
        await self.store.events.record(org_id=ex.orgId, kind="execution.created", at=self._clock(),
                                       resource={"type": "execution", "id": ex.id},
                                       data={"name": ex.name, "steps": len(ex.steps)})
        d = await self._apply(ex.id, Tick(), patient=False)
        return _out(d.execution)

    def _lock(self, execution_id: str) -> asyncio.Lock:
        return self._locks.setdefault(execution_id, asyncio.Lock())

    async def _load(self, execution_id: str) -> Execution:
        ex = self._live.get(execution_id)
        if ex is None:
            ex = Execution.model_validate(await self.store.executions.get(None, execution_id))
        return ex

    async def _own(self, principal: Principal, execution_id: str) -> None:
        await self.store.executions.get(principal.org_id, execution_id)  # 404 for other orgs

    async def _apply(self, execution_id: str, event: Event, *, patient: bool = True) -> Decision:
        """Decide, store, then act. ``patient``: keep trying while the database is down
        (a step's result must not be lost); otherwise the caller gets the 503."""
        token = correlation.set(current_correlation())
        try:
            return await self._apply_bound(execution_id, event, patient=patient)
        finally:
            correlation.reset(token)  # the caller's id again, whatever _apply_bound set

    async def _apply_bound(self, execution_id: str, event: Event, *, patient: bool) -> Decision:
        async with self._lock(execution_id):
            ex = await self._load(execution_id)
            # Whoever reports (a node's result, a timer, a request), the execution's logs and
            # the commands it sends carry the id of the request that created it.
            correlation.set(ex.correlationId or current_correlation())
            try:
                d = decide(ex, event, self._clock())
            except Rejected as e:
                raise InvalidState(str(e)) from None
            if d.changed:
                new = d.execution
                new.version = ex.version + 1
                for dispatch in d.dispatch:
                    self._mark_sent(new, dispatch)
                if d.finished:
                    # The end's effects (a deployment's status, or its deletion) land before
                    # the terminal state does: whoever reads the execution as finished also
                    # reads what it did. A crash in between replays the end; the hook is
                    # idempotent. A database outage does not skip it: it waits (patient)
                    # or fails the call before anything is saved.
                    await self._hook(new, started=False, patient=patient)
                await self._save(new, patient=patient)
                record_execution(ex, new)  # steps and executions that ended, for metrics
                log_changes(ex, new)
            if not d.execution.terminal:
                self._live[execution_id] = d.execution
            for abort in d.abort:
                self._abort(d.execution, abort)
            for dispatch in d.dispatch:
                self._dispatch(d.execution, dispatch)
            self._arm(execution_id, d.wake_at)
        if d.changed and ex.startedAt is None and d.execution.startedAt is not None:
            await self._hook(d.execution, started=True)
        if d.finished:
            self._live.pop(execution_id, None)
            self._locks.pop(execution_id, None)
            if not d.changed:
                await self._hook(d.execution, started=False, patient=patient)
            done = self._finished.get(execution_id)
            if done is not None:
                done.set()
        return d

    async def _save(self, ex: Execution, *, patient: bool) -> None:
        delay = 0.2
        while True:
            try:
                await self.store.executions.save(_doc(ex))
                return
            except Unavailable:
                if not patient:
                    raise
                log.warning("database unavailable; execution %s waits to be saved", ex.id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except VersionConflict:
                # Another writer moved it on (a replaced orchestrator still running):
                # ours is stale. Drop it; the stored state wins and is reloaded.
                self._live.pop(ex.id, None)
                raise

    def _mark_sent(self, ex: Execution, dispatch: Dispatch) -> None:
        step = ex.steps[dispatch.index]
        now = self._clock()
        if step.kind == "node":
            step.commandId = command_id(ex.id, step.index, dispatch.attempt, ex.retryCount)
            record(step, "sent", step.command, at=now, messageId=step.commandId,
                   nodeId=step.nodeId)
        else:
            record(step, "started", step.command, at=now)

    def _dispatch(self, ex: Execution, dispatch: Dispatch) -> None:
        step = ex.steps[dispatch.index]
        if step.kind == "node":
            work = self._run_node(ex.id, ex.orgId, dispatch, step.nodeId or "", step.command,
                                  step.data, step.commandId or "",
                                  ex.resource.model_dump() if ex.resource else None)
        else:
            work = self._run_controller(ex, dispatch)
        self._spawn(ex.id, dispatch.index, work)

    def _spawn(self, execution_id: str, index: int, work: Coroutine[Any, Any, None]) -> None:
        key = (execution_id, index)
        old = self._tasks.get(key)
        if old is not None and not old.done():
            old.cancel()
        task = asyncio.create_task(work)
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._tasks.pop(key, None)
                               if self._tasks.get(key) is t else None)

    def _abort(self, ex: Execution, abort: Abort) -> None:
        task = self._tasks.pop((ex.id, abort.index), None)
        if task is not None and not task.done():
            task.cancel()
        step = ex.steps[abort.index]
        if step.kind == "node" and abort.command_id and step.nodeId:
            node = self._node(step.nodeId, ex.orgId)
            asyncio.create_task(_quietly(node.call("cancel", abort.command_id)))

    def _arm(self, execution_id: str, at: dt.datetime | None) -> None:
        timer = self._timers.pop(execution_id, None)
        if timer is not None:
            timer.cancel()
        if at is None:
            return
        delay = max(0.0, (at - self._clock()).total_seconds()) + 0.001
        loop = asyncio.get_running_loop()
        self._timers[execution_id] = loop.call_later(
            delay, lambda: asyncio.create_task(self._tick(execution_id)))

    async def _tick(self, execution_id: str) -> None:
        try:
            await self._apply(execution_id, Tick())
        except AiwmError as e:
            log.warning("tick of %s failed: %s", execution_id, e.detail)

    async def _run_node(self, execution_id: str, org_id: str, dispatch: Dispatch, node_id: str,
                        command: str, data: dict[str, Any], cmd_id: str,
                        resource: dict[str, str] | None) -> None:
        node = self._node(node_id, org_id)
        messages: list[dict[str, Any]] = []
        try:
            if command == "model.download":  # its signed URLs may have expired since
                from actors.deployment_flows import fresh_download

                data = await fresh_download(self.store, self.objects, org_id, node_id, data,
                                            self._settings.aiwm_download_url_ttl)
            elif command == "model.prune":  # what is needed now stays
                from actors.deployment_flows import fresh_tidy

                data = await fresh_tidy(self.store, org_id, node_id, data, resource, execution_id)
            elif command == "deployment.create" and resource and resource["type"] == "deployment":
                from actors.deployment_flows import replacing_server

                await replacing_server(self.store, org_id, resource["id"], execution_id,
                                       data.get("modelVersion"))
            reply = await _send_and_wait(
                node, command, data, resource, cmd_id, messages, self._clock,
                self._progress_of(execution_id, dispatch) if command in SHOWS_PROGRESS else None)
        except asyncio.CancelledError:
            raise
        except Cancelled:
            return  # aborted: the machine already knows
        except AiwmError as e:
            event: Event = StepFailed(dispatch.index, dispatch.attempt,
                                      StepError(code=e.code, message=e.detail,
                                                retryable=e.code not in PERMANENT),
                                      tuple(messages))
        else:
            messages.append({"at": self._clock(), "direction": "received", "type": "command.result",
                             "attempt": dispatch.attempt, "success": bool(reply.get("success")),
                             **({"error": reply["error"]} if reply.get("error") else {})})
            if reply.get("success"):
                event = StepSucceeded(dispatch.index, dispatch.attempt,
                                      reply.get("result") or {}, tuple(messages))
            else:
                err = reply.get("error") or {}
                code = str(err.get("code") or "command_failed")
                event = StepFailed(dispatch.index, dispatch.attempt, StepError(
                    code=code, message=str(err.get("message") or "the node reported a failure"),
                    retryable=code not in PERMANENT), tuple(messages))
        await self._report(execution_id, event)

    def _progress_of(self, execution_id: str,
                     dispatch: Dispatch) -> Callable[[dict[str, Any]], Coroutine[Any, Any, None]]:
        """What a running attempt calls to show how far it got, as its step's ``progress``
        (best effort: a failure to store it is logged, never the step's)."""
        async def progress(info: dict[str, Any]) -> None:
            try:
                await self._apply(execution_id,
                                  StepProgress(dispatch.index, dispatch.attempt, info),
                                  patient=False)
            except AiwmError as e:
                log.debug("progress of %s not stored: %s", execution_id, e.detail)

        return progress

    async def _run_controller(self, ex: Execution, dispatch: Dispatch) -> None:
        step = ex.steps[dispatch.index]
        action = self._actions.get(step.command)
        event: Event
        if action is None:
            event = StepFailed(dispatch.index, dispatch.attempt, StepError(
                code="unknown_action", message=f"no controller action {step.command!r}",
                retryable=False))
        else:
            ctx = ActionContext(execution=ex, step=step, store=self.store, node=self._node,
                                objects=self.objects, settings=self._settings,
                                progress=self._progress_of(ex.id, dispatch))
            try:
                result = await action(ctx)
                event = StepSucceeded(dispatch.index, dispatch.attempt, result, (
                    {"at": self._clock(), "direction": "finished", "type": step.command,
                     "attempt": dispatch.attempt},))
            except asyncio.CancelledError:
                raise
            except StepFailure as f:
                event = StepFailed(dispatch.index, dispatch.attempt, f.error)
            except AiwmError as e:
                event = StepFailed(dispatch.index, dispatch.attempt, StepError(
                    code=e.code, message=e.detail, retryable=e.code not in PERMANENT))
            except Exception as e:  # a bug in an action must fail the step, not hang it
                log.exception("controller action %s failed", step.command)
                event = StepFailed(dispatch.index, dispatch.attempt, StepError(
                    code="internal", message=f"{type(e).__name__}: {e}", retryable=True))
        await self._report(ex.id, event)

    async def _report(self, execution_id: str, event: Event) -> None:
        try:
            await self._apply(execution_id, event)
        except VersionConflict:
            await self._apply(execution_id, event)  # reloaded from the database: once more

    async def _resume(self, ex: Execution) -> None:
        """Pick up an execution found unfinished at start."""
        self._live[ex.id] = ex
        for step in ex.steps:
            if step.status.value == "running":
                self._dispatch(ex, Dispatch(step.index, step.attempts))
        await self._tick(ex.id)

    async def _sweep_leftovers(self) -> None:
        """Every hour, from the start: :meth:`sweep`."""
        while True:
            try:
                await self.sweep()
            except Exception:  # never the end of the sweeps: the next hour tries again
                log.exception("sweep failed")
            await asyncio.sleep(LEFTOVER_SWEEP)

    async def sweep(self) -> dict[str, int]:
        """Clear up what interrupted work left: staging folders of imports and uploads
        that nothing will finish (:mod:`aiwm.leftovers`), and model versions whose delete
        stopped half-way (their files are deleted from the store, then their records).
        Returns how many of each went; failures are logged and left for the next sweep."""
        from aiwm.leftovers import sweep
        from aiwm.objectstore.base import version_prefix

        folders = versions = 0
        try:
            folders = len(await asyncio.to_thread(
                sweep, Path(self._settings.aiwm_home),
                import_ttl=self._settings.aiwm_import_staging_ttl))
        except OSError as e:
            log.warning("sweeping staging folders failed: %s", e)
        cutoff = self._clock() - dt.timedelta(seconds=DELETE_GRACE)
        try:
            for v in await self.store.model_versions.unfinished_deletes(cutoff):
                await self.objects.delete_prefix(version_prefix(v["orgId"], v["modelId"],
                                                                v["version"]))
                await self.store.model_versions.remove(v["orgId"], v["modelId"], v["version"])
                log.info("finished deleting version %d of model %s (org %s), begun %s",
                         v["version"], v["modelId"], v["orgId"], v["deletingAt"],
                         extra={"modelId": v["modelId"]})
                versions += 1
        except AiwmError as e:  # the database or the store is still down: next time
            log.warning("finishing interrupted version deletes failed: %s", e.detail)
        return {"stagingFolders": folders, "versions": versions}

    async def _watch_timeouts(self) -> None:
        """The backstop for timers: every EXECUTION_TIMEOUT_CHECK_INTERVAL, tick what is
        overdue, including executions this process does not hold."""
        every = self._settings.execution_timeout_check_interval / 1000
        while True:
            await asyncio.sleep(every)
            try:
                overdue = await self.store.executions.overdue(self._clock())
            except AiwmError as e:
                log.warning("timeout check failed: %s", e.detail)
                continue
            for execution_id in {*overdue, *self._live}:
                await self._tick(execution_id)

    async def _check_nodes(self, ex: Execution) -> None:
        wanted = sorted({s.nodeId for s in ex.steps if s.kind == "node" and s.nodeId})
        if not wanted:
            return
        found = await self.store.documents("nodes").find(
            {"orgId": ex.orgId, "deletedAt": None, "id": {"$in": wanted}})
        missing = sorted(set(wanted) - {n["id"] for n in found})
        if missing:
            raise InvalidReference(f"no node with id {', '.join(map(repr, missing))}", extra={
                "errors": [{"field": "body.steps", "message": f"no node {m!r}",
                            "type": "invalid_reference"} for m in missing]})

    async def _hook(self, ex: Execution, *, started: bool, patient: bool = False) -> None:
        """Tell the world: an event per start and end, and the deployment's status.

        A start is best effort (the end sets the deployment's final status anyway). An end
        must not be lost to a database outage, since the terminal state is saved after
        it and nothing replays the end of a saved terminal execution: ``patient`` waits
        for the database (as :meth:`_save` does), otherwise :class:`Unavailable` goes to
        the caller before anything is saved. Other failures are logged."""
        from actors.deployment_flows import on_execution

        kind = "execution.started" if started else f"execution.{ex.status.value}"
        recorded = False
        delay = 0.2
        while True:
            try:
                if not recorded:
                    await self.store.events.record(
                        org_id=ex.orgId, kind=kind, at=self._clock(),
                        resource={"type": "execution", "id": ex.id},
                        data={"name": ex.name, "progress": ex.progress,
                              **({"error": ex.error.model_dump()}
                                 if ex.error and not started else {})})
                    recorded = True
                await on_execution(self.store, ex, started=started, clock=self._clock)
                return
            except Unavailable as e:
                if started:
                    log.warning("after %s of %s: %s", kind, ex.id, e.detail)
                    return
                if not patient:
                    raise
                log.warning("database unavailable; the end of execution %s waits to be "
                            "applied", ex.id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except AiwmError as e:
                log.warning("after %s of %s: %s", kind, ex.id, e.detail)
                return


def log_changes(old: Execution, new: Execution) -> None:
    """A line per step whose status changed, and one when the execution ends."""
    for before, step in zip(old.steps, new.steps, strict=True):
        if before.status == step.status:
            continue
        failed = step.status.value in ("failed", "retrying")
        log.log(logging.WARNING if failed else logging.INFO, "step %d %s of %s: %s%s",
                step.index, step.name, new.id, step.status.value,
                f" ({step.error.code}: {step.error.message})" if failed and step.error else "",
                extra={"executionId": new.id, "step": step.index, "attempt": step.attempts,
                       **({"nodeId": step.nodeId} if step.nodeId else {}),
                       **({"commandId": step.commandId} if step.commandId else {})})
    if new.terminal and not old.terminal:
        log.log(logging.INFO if new.status.value == "completed" else logging.WARNING,
                "execution %s %s", new.id, new.status.value,
                extra={"executionId": new.id, "progress": new.progress})


async def _send_and_wait(node: Node, command: str, data: dict[str, Any],
                         resource: dict[str, str] | None, cmd_id: str,
                         messages: list[dict[str, Any]],
                         clock: Callable[[], dt.datetime],
                         on_progress: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                         ) -> dict[str, Any]:
    """Send (idempotently, by id) and wait for the result as long as the step lasts (the
    machine's timeout cancels this task). One actor call per wait: send and result
    together. With ``on_progress``, every PROGRESS_POLL seconds without a result it gets
    the latest progress the node reported for the command, when that changed."""
    acknowledged = False
    last: dict[str, Any] | None = None
    while True:
        try:
            reply = await node.call("run", command, data, resource, cmd_id,
                                    RESULT_POLL if on_progress is None else PROGRESS_POLL)
        except CommandTimeout:
            if on_progress is not None:
                try:
                    latest = await node.call("progress", cmd_id)
                except AiwmError:  # progress is best effort; the result is what counts
                    latest = None
                if latest and latest != last:
                    last = latest
                    await on_progress(latest)
            continue  # no result yet (the node may be offline): keep waiting
        if reply["acknowledged"] and not acknowledged:
            acknowledged = True
            messages.append({"at": clock(), "direction": "received", "type": "command.ack",
                             "messageId": cmd_id})
        return reply["result"]  # type: ignore[no-any-return]


async def _quietly(work: Coroutine[Any, Any, Any]) -> None:
    try:
        await work
    except Exception as e:  # best effort: the step is already over for us
        log.debug("cancel failed: %s", e)


def doc_terminal(live: dict[str, Execution], execution_id: str) -> bool:
    return execution_id not in live


def _doc(ex: Execution) -> dict[str, Any]:
    """The stored form: datetimes stay datetimes (deadline queries compare them)."""
    return _plain(ex.model_dump(mode="python"))  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _jsonable(doc: dict[str, Any]) -> dict[str, Any]:
    return Execution.model_validate(doc).model_dump(mode="json")


def _out(ex: Execution) -> dict[str, Any]:
    return ex.model_dump(mode="json")


def _node_client(settings: Settings) -> Callable[[str, str], Node]:
    clients: dict[tuple[str, str], Node] = {}

    def get(node_id: str, org_id: str) -> Node:
        from actors import NodeClient

        key = (node_id, org_id)
        if key not in clients:
            clients[key] = NodeClient(settings, node_id, org_id)
        return clients[key]

    return get
